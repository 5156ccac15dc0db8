"""Whole parameters where a model is sharded: the one seam between the model layer and the
distributed engine.

Under DeepSpeed ZeRO-3 every parameter is partitioned across ranks: outside its module's forward
its ``.data`` is an empty tensor, and its full shape is ``ds_shape``. Code that reads a
parameter outside that forward (the fused loss reads the LM head; checkpoints, exports and the
fp32 head wrapper read weights directly) does so inside ``gathered(...)``, and sizes come from
``full_shape`` / ``full_numel``. Without sharding all of this costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's shape as the model defines it, also while it is partitioned."""
    return param.ds_shape if is_sharded(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_sharded(param) else param.numel()


@contextmanager
def gathered(params: Iterable[torch.Tensor], *, modify: bool = False) -> Iterator[None]:
    """Inside the block the given parameters are whole on every rank. With ``modify``, what rank 0
    writes into them is partitioned back to every rank on exit (every rank should write the same).
    A parameter that is whole already (its module is running: a LoRA student's head read as its
    base teacher's inside the student's head forward) is left to whoever gathered it."""
    sharded = [p for p in params if is_sharded(p) and (modify or not _available(p))]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0 if modify else None):
        yield


def _available(param: torch.Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE
