"""The teacher: everything training asks of it, behind one interface, wherever it runs.

The loop, the sources and the objective see a ``Teacher``:

- ``hidden_states``: its final hidden states (after the last norm) at the positions that predict a
  next token, and ``head``, its LM head: together what the fused loss needs (``logits`` where the
  loss runs on full logits; ``head_problem`` says when hidden states and head cannot stand in for
  its logits; ``top_k`` where only its top-k log-probabilities are known);
- ``generate``: sampled responses to prompts (SeqKD), with the sources' sampling semantics;
- ``verifier``: a KV-cached forward over drafted blocks (SKD's verification rounds).

``LocalTeacher`` is the in-process teacher, sharded by ZeRO-3 or not, and the student's own base
weights (``teacher.student_base``); ``distill.offline.teacher.CachedTeacher`` reads it from disk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from distill.config import SamplingConfig
from distill.errors import DistillError
from distill.generation import sample
from distill.lm_head import load_lm_head
from distill.models import final_hidden, fp32_linear, fused_head_problem, lm_head, lm_logits
from distill.speculative import CachedForward
from distill.top_k_loss import TopK

Head = tuple[torch.Tensor | None, torch.Tensor | None]  # the LM head's weight and bias (or None)


class Teacher(ABC):
    """What the loop, the sources and the objective ask of a teacher (see the module docstring)."""

    name: str
    config: PretrainedConfig  # its model config: vocabulary rows, transforms after the LM head
    prefetches: bool = False  # whether ``prefetch`` starts anything (a teacher that runs elsewhere)

    @property
    def module(self) -> torch.nn.Module | None:
        """The model itself where it runs in this process (its own evaluation rows, the placement
        report); None where it runs elsewhere."""
        return None

    def generation_models(self) -> tuple[torch.nn.Module, ...]:
        """The modules a generation round gathers on this rank (none where it runs elsewhere)."""
        return ()

    @abstractmethod
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T - 1, H]`` at the positions that predict a next token;
        ``positions`` (bool ``[B, T - 1]``): those the loss counts; others may be anything."""

    def top_k(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> TopK | None:
        """Where the teacher is known only by its top-k log-probabilities and tail mass (a compact
        cache): those at ``positions``, row-major; None where ``hidden_states`` gives it whole."""
        return None

    def prefetch(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bf16: bool = False) -> None:
        """Start computing the hidden states of ``batches`` ((input_ids, attention_mask, positions)
        each) that ``hidden_states`` will be asked for next, where the teacher runs elsewhere and
        can work while this process trains; by default nothing."""
        return

    @abstractmethod
    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        """The LM head's weight and bias (rows beyond ``vocab`` dropped), whole inside the block."""

    @abstractmethod
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[B, T - 1, V]`` in fp32 (the unfused loss); ``positions`` as for
        ``hidden_states``."""

    @abstractmethod
    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        """Why ``head(hidden_states)`` would not be its logits (soft-capping, ...); None when it is."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None = None, hidden: list | None = None, synced: bool = False) -> list[list[int]]:
        """A response per prompt, as ``distill.generation.sample`` draws it; with ``hidden`` the
        final hidden states before each response token are appended, one tensor per prompt."""

    @abstractmethod
    def verifier(self) -> CachedForward:
        """A fresh KV-cached forward for one SKD generation (``distill.speculative``)."""


class LocalTeacher(Teacher):
    """The teacher in this process: a model (ZeRO-3 sharded or whole), or a LoRA student's base
    weights (``models.AdaptersDisabled``)."""

    def __init__(self, model: PreTrainedModel, name: str = "teacher") -> None:
        self.model, self.name, self.config = model, name, model.config

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def generation_models(self) -> tuple[torch.nn.Module, ...]:
        return (self.model,)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        return final_hidden(self.model, input_ids, attention_mask, bf16)

    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        return lm_head(self.model, vocab)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        return lm_logits(self.model, input_ids, attention_mask, bf16, vocab)

    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        return fused_head_problem(self.model, input_ids, attention_mask)

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None = None, hidden: list | None = None, synced: bool = False) -> list[list[int]]:
        return sample(self.model, prompts, cfg, pad_id=pad_id, stops=stops, seed=seed, vocab=vocab, hidden=hidden,
                      synced=synced)

    def verifier(self) -> CachedForward:
        return CachedForward(self.model)


class HeadTeacher(Teacher):
    """A teacher that runs elsewhere (an offline cache, a served model) and sends hidden states:
    this process holds its LM head alone, read from its checkpoint (``distill.lm_head``), and
    applies it where full logits are asked for."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: PretrainedConfig,
                 name: str = "teacher") -> None:
        self.weight, self.bias, self.config, self.name = weight, bias, config, name

    @classmethod
    def head_of(cls, path: str, dtype: torch.dtype, device: torch.device, vocab: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, PretrainedConfig]:
        """The LM head of the checkpoint at ``path`` on ``device``, checked to cover ``vocab``, and its config."""
        head = load_lm_head(path, dtype)
        if head.weight.shape[0] < vocab:
            raise DistillError(f"teacher {path}: its LM head has {head.weight.shape[0]} rows for a vocabulary of "
                               f"{vocab}")
        return head.weight.to(device), None if head.bias is None else head.bias.to(device), \
            AutoConfig.from_pretrained(path)

    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        return nullcontext((self.weight[:vocab], None if self.bias is None else self.bias[:vocab]))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, bf16=bf16, positions=positions)
        with self.head(vocab) as (w, b):
            return fp32_linear(hidden, w, b)

    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        return None  # a head whose logits are transformed after it is refused when it is read

    def scatter(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[N, H]`` of the counted ``positions`` (bool ``[B, T - 1]``, row-major)
        laid out as ``hidden_states`` returns them, zeros elsewhere, in the head's dtype."""
        out = torch.zeros((*positions.shape, self.weight.shape[1]), dtype=self.weight.dtype, device=positions.device)
        out[positions] = rows.to(out.device, out.dtype)
        return out


def as_teacher(teacher: Teacher | PreTrainedModel | None) -> Teacher | None:
    """A ``Teacher`` for a model given directly (tests, benchmarks, the Python API)."""
    return teacher if teacher is None or isinstance(teacher, Teacher) else LocalTeacher(teacher)
