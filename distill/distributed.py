"""Data parallelism on DeepSpeed ZeRO: the run's ``Engine``.

DeepSpeed is called here, and by transformers' loading under ZeRO-3 (``HfDeepSpeedConfig``, set
up here) and ``distill.export``'s gathering of sharded weights. Where the models live is the
run's ``distill.placement.Placement``, which ``distill.plan`` plans memory by too.

The training loop (``distill.loop``) is the same in one process and on many ranks; what differs
goes through an ``Engine``:

- every rank computes its share of each micro-batch (``shard``) and the token counts of a step are
  summed over the ranks before any backward, so the step's loss is the mean over every counted
  token of every rank whatever the world size (DeepSpeed averages gradients over ranks: each rank
  scales its sum by ``world / count``);
- ``backward`` and ``step`` are plain PyTorch in one process and DeepSpeed's engine otherwise, with
  the ZeRO stage of ``deepspeed.*`` and clipping, bf16 and accumulation from the recipe's fields;
- ``loading`` partitions a model's weights as they are read (ZeRO-3), so no rank holds a whole
  pretrained model (a student built from ``arch`` is partitioned once built);
- ``generation`` gathers a sharded model once for a generation round and takes its ZeRO hooks off,
  so token-by-token sampling runs without communication and ranks need not finish together (the
  private hooks it takes off are fenced in ``_zero3_hooks_off``, behind a version check);
- checkpoints are DeepSpeed's per-rank files inside the run's atomic checkpoint directory.

Launch with ``deepspeed --num_gpus N -m distill ...`` or ``torchrun --nproc-per-node N -m distill
...``: both set RANK, WORLD_SIZE and LOCAL_RANK, which is all this module reads.
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import re
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.checkpoint import (
    atomic_dir,
    checkpoint_dir,
    fsync_file,
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from distill.config import DistillConfig
from distill.errors import DistillError
from distill.models import load_trainable_state, trainable_state
from distill.placement import Placement, launch_env, local_world_size
from distill.sharding import is_sharded

DEEPSPEED_TAG = "deepspeed"  # the folder of DeepSpeed's files inside a checkpoint


def _unlink_shared_buffers(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer in /dev/shm. DeepSpeed never
    unlinks it, so every run would leave 66 MB a rank in shared memory until the machine runs
    out; unlinked once every rank has it mapped, it lives exactly as long as the processes."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def free_port() -> int:
    """A free TCP port on this machine (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtype_flags(dtype: str) -> dict[str, Any]:
    return {"bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"}}


class Engine:
    """How a run's student and teacher are placed, stepped and saved (see the module docstring)."""

    def __init__(self, cfg: DistillConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.rank, self.world, self.local_rank = launch_env()
        self.placement = Placement.of(cfg, self.world, device.type)
        self.device = device
        if device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.uses_deepspeed:
            if self.world == 1:  # a ZeRO stage in one process started without a launcher
                for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                                   ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                    os.environ.setdefault(key, value)
            if device.type == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
                # The machine's cores shared by its ranks, not each rank taking all of them.
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
            import deepspeed

            if not dist.is_initialized():
                # Rank 0 alone exports the model and measures the draft while the others wait.
                # On the CPU DeepSpeed builds its shared-memory collectives here and prints so.
                with redirect_stdout(io.StringIO()):
                    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl",
                                               verbose=False, timeout=datetime.timedelta(hours=3))
                if device.type == "cpu":
                    dist.barrier()  # every rank has mapped every other's shared-memory buffer by now
                    _unlink_shared_buffers(self.rank)
        tc = cfg.trainer
        if tc.batch_size % self.world:
            raise DistillError(f"trainer.batch_size={tc.batch_size} must be a multiple of the {self.world} ranks "
                               "(each computes an equal share of every micro-batch)")
        if cfg.reward.alpha > 0 and (tc.batch_size // cfg.reward.group) % self.world:
            raise DistillError(f"trainer.batch_size / reward.group = {tc.batch_size // cfg.reward.group} prompts must "
                               f"be a multiple of the {self.world} ranks (each rank samples whole groups)")
        self.student_engine = None  # DeepSpeed's engine around the student
        self._offload: dict[int, Any] = {}  # id(model) -> its ZeRO-3 parameter offload (hooks)
        self._role: dict[int, str] = {}  # id(model) -> student or teacher
        # Per role: gathered whole for generation (the plan's decision: whether it fits).
        self.gathers: dict[str, bool] = {}
        self._zero3_config: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage(self) -> int:
        return self.placement.stage

    @property
    def uses_deepspeed(self) -> bool:
        return self.placement.uses_deepspeed

    # --- collectives (no-ops in one process) --------------------------------------------------

    def all_sum(self, value: float | int | torch.Tensor) -> float | int | torch.Tensor:
        """``value`` summed over the ranks."""
        if self.world == 1:
            return value
        # On the run's device: NCCL reduces CUDA tensors only.
        t = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float64,
                                                                                device=self.device)
        dist.all_reduce(t)
        return t if torch.is_tensor(value) else type(value)(t.item())

    def all_max(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor(value, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def shard(self, items: list) -> list:
        """This rank's share of a micro-batch: every ``world``-th item from its rank."""
        return items[self.rank:: self.world]

    # --- models ---------------------------------------------------------------------------------

    def _ds_config(self, dtype: str, stage: int, *, train: bool) -> dict[str, Any]:
        p, tc = self.placement, self.cfg.trainer
        zero: dict[str, Any] = {"stage": stage}
        if stage == 3 and p.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        if train and p.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        micro = tc.batch_size // self.world
        return {
            "train_micro_batch_size_per_gpu": micro,
            # distill accumulates itself (its micro-batches and length groups), marking the boundary.
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro * self.world,
            "gradient_clipping": tc.max_grad_norm if train else 0.0,
            "zero_optimization": zero,
            **_dtype_flags(dtype),
            "zero_allow_untested_optimizer": True,  # torch's AdamW, the optimizer of the plain path
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 62,
        }

    @contextmanager
    def loading(self, role: str, dtype: str | None = None) -> Iterator[None]:
        """Within the block, ``from_pretrained`` partitions the ``role`` model's weights (of ``dtype``,
        default the role's) across the ranks as it reads them (ZeRO-3 for this role), instead of
        each rank loading all of them."""
        if not self.placement.sharded(role):
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        dtype = dtype or getattr(self.cfg, role).dtype
        # transformers reads ZeRO-3 from this object while it lives (a weak reference).
        self._zero3_config = HfDeepSpeedConfig(self._ds_config(dtype, 3, train=role == "student"))
        try:
            yield
        finally:
            self._zero3_config = None

    def wrap_teacher(self, teacher: torch.nn.Module, dtype: str | None = None) -> torch.nn.Module:
        """The teacher (of ``dtype``, default ``teacher.dtype``; each of several has its own) as an
        inference-only ZeRO-3 engine (no optimizer state) when it is sharded."""
        if not self.placement.shard_teacher:
            return teacher
        import deepspeed

        engine, *_ = deepspeed.initialize(model=teacher, config=self._ds_config(dtype or self.cfg.teacher.dtype, 3,
                                                                                   train=False))
        self._offload[id(engine.module)] = engine.optimizer  # DeepSpeedZeRoOffload: the hooks
        self._role[id(engine.module)] = "teacher"
        engine.module.eval()
        return engine.module

    def wrap_student(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """The student under DeepSpeed's engine with ``optimizer`` (its AdamW) at the chosen stage."""
        if not self.uses_deepspeed:
            self.optimizer = optimizer
            return student
        import deepspeed

        params = [p for p in student.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, model_parameters=params,
                                          config=self._ds_config(self.cfg.student.dtype, self.stage, train=True))
        self.student_engine, self.optimizer = engine, optimizer
        if self.stage == 3:
            self._offload[id(engine.module)] = engine.optimizer.parameter_offload
            self._role[id(engine.module)] = "student"
        return engine.module

    def start_forward(self) -> None:
        """Call before each training forward of the student. distill calls the student's modules,
        not DeepSpeed's ``engine(...)``, whose forward tells ZeRO-3 that a new micro-batch begins:
        without it ZeRO-3 keeps only the last micro-batch's gradients of a step."""
        if self.student_engine is not None and hasattr(self.student_engine.optimizer, "clear_backward_seen_flag"):
            self.student_engine.optimizer.clear_backward_seen_flag()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Gradients of ``loss`` added to the step's; ``last``: the step's final backward."""
        if self.student_engine is None:
            loss.backward()
            return
        self.student_engine.set_gradient_accumulation_boundary(last)
        self.student_engine.backward(loss, scale_wrt_gas=False)

    def step(self, params: list[torch.nn.Parameter], max_grad_norm: float) -> float:
        """Clip, take the optimizer step and zero the gradients; the gradient norm before clipping."""
        if self.student_engine is None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        # Stage 0 clips without recording the norm: taken here from the averaged gradients.
        before = float(torch.nn.utils.clip_grad_norm_(params, float("inf"))) if self.stage == 0 else None
        self.student_engine.step()
        norm = self.student_engine.get_global_grad_norm()
        return before if norm is None and before is not None else float("nan") if norm is None else float(norm)

    @contextmanager
    def generation(self, *models: torch.nn.Module | None) -> Iterator[bool]:
        """Within the block every sharded model of ``models`` is whole on each rank, without its ZeRO
        hooks: one gather for the round, then decoding without communication (each rank samples its
        own prompts, for as many tokens as they need). Entered and left by every rank together.

        A model the plan found too large to gather (``gathers``) stays sharded: the block yields
        True, and generation must then be synced (every rank decoding until all are done)."""
        # A LoRA student's base as the teacher (models.AdaptersDisabled) is the student's weights.
        models = tuple(getattr(m, "lora_student", m) for m in models if m is not None)
        sharded = [m for m in dict.fromkeys(models) if any(is_sharded(p) for p in m.parameters())]
        synced = self.world > 1 and any(not self.gathers.get(self._role.get(id(m), ""), True) for m in sharded)
        sharded = [m for m in sharded if self.gathers.get(self._role.get(id(m), ""), True)]
        with ExitStack() as stack:
            if sharded:
                import deepspeed

                for m in sharded:
                    stack.enter_context(deepspeed.zero.GatheredParameters(list(m.parameters())))
                stack.enter_context(_zero3_hooks_off([self._offload[id(m)] for m in sharded]))
            yield synced

    def held_parameters(self, model: torch.nn.Module) -> int:
        """Parameter elements this rank holds of ``model`` (its ZeRO-3 partitions, or all of them)."""
        return sum(p.ds_tensor.numel() if is_sharded(p) else p.numel() for p in model.parameters())

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, run_dir: Path, step: int, student: torch.nn.Module, state: dict[str, Any],
                        keep: int) -> None:
        """``checkpoints/step-N`` of the run, atomically: the trainer ``state`` and the student's
        trainable weights and optimizer state (DeepSpeed's files, one set per rank, when sharded)."""
        if not self.uses_deepspeed:
            state = {**state, "optimizer": self.optimizer.state_dict(), "rng": rng_state()}
            save_checkpoint(run_dir, step, trainable_state(student), state, keep)
            return
        state = {**state, "world_size": self.world, "stage": self.stage}

        def write(tmp: Path) -> None:
            # Each rank writes and fsyncs its own files; then every rank learns whether all did,
            # before rank 0 renames the directory: a rank that failed stops every rank at once
            # (no rank is left waiting at a barrier), and nothing half-written is renamed.
            problem = None
            try:
                before = _files(tmp)
                # Frozen weights (a LoRA student's base) come from student.path on resume.
                self.student_engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False,
                                                    exclude_frozen_parameters=True)
                torch.save(rng_state(), tmp / f"rng-{self.rank}.pt")
                if self.is_main:
                    torch.save(state, tmp / "trainer_state.pt")
                for f in _files(tmp) - before:
                    if _written_by(f.name, self.rank):
                        fsync_file(f)
            except Exception as e:  # a full disk, a lost mount: reported by every rank below
                problem = f"{type(e).__name__}: {e}"
            failed = [(r, p) for r, p in enumerate(self.all_gather(problem)) if p is not None]
            if failed:
                rank, what = failed[0]
                raise DistillError(f"checkpoint step {step}: rank {rank} could not write its part ({what}); "
                                   f"no rank saved it, and the run stops at its last checkpoint")

        if self.is_main:
            with atomic_dir(checkpoint_dir(run_dir, step), fsync_files=False) as tmp:
                write(Path(self.broadcast(str(tmp))))
            prune_checkpoints(run_dir, keep)
        else:
            write(Path(self.broadcast(None)))
        self.barrier()  # no rank goes on before the checkpoint is in place

    def load_checkpoint(self, run_dir: Path, student: torch.nn.Module) -> dict[str, Any] | None:
        """Load the newest checkpoint of the run into the student and its optimizer, restore this
        rank's random state, and return the trainer state (None without a checkpoint)."""
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            return None
        latest = ckpts[-1]
        sharded_ckpt = (latest / DEEPSPEED_TAG).is_dir()
        if sharded_ckpt != self.uses_deepspeed:
            raise DistillError(
                f"resume: {latest} was written {'on DeepSpeed' if sharded_ckpt else 'by one process without DeepSpeed'}"
                f"; resume it the same way (deepspeed.stage={self.stage}, {self.world} ranks now)")
        if not self.uses_deepspeed:
            weights, state = load_latest_checkpoint(run_dir)
            load_trainable_state(student, weights, f"resume {run_dir}")
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            return state
        try:
            state = torch.load(latest / "trainer_state.pt", weights_only=False)
        except Exception as e:  # a damaged file must not be half-loaded
            raise DistillError(f"resume: cannot read checkpoint {latest}: {e}") from None
        if (state["world_size"], state["stage"]) != (self.world, self.stage):
            raise DistillError(f"resume: {latest} was written by {state['world_size']} ranks at ZeRO stage "
                               f"{state['stage']}; resume it on as many ranks (now {self.world})")
        self.student_engine.load_checkpoint(str(latest), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False, load_module_strict=False)
        set_rng_state(torch.load(latest / f"rng-{self.rank}.pt", weights_only=False))
        return state


def _files(directory: Path) -> set[Path]:
    return {f for f in directory.rglob("*") if f.is_file()}


def _written_by(name: str, rank: int) -> bool:
    """Whether rank ``rank`` wrote the checkpoint file ``name``: its own (DeepSpeed's
    ``zero_pp_rank_R_...``, ``rng-R.pt``), or for rank 0 the shared ones (the trainer state,
    DeepSpeed's ``mp_rank_00_model_states.pt``)."""
    own = re.search(r"(?:zero_pp_rank_|rng-)(\d+)", name)
    return int(own.group(1)) == rank if own else rank == 0


# DeepSpeed releases whose ZeRO-3 hook internals _zero3_hooks_off was written against and tested with.
ZERO3_HOOKS_TESTED = ((0, 16), (0, 20))


@functools.cache
def _check_zero3_hooks_version() -> None:
    """DistillError, by name, for a DeepSpeed outside ``ZERO3_HOOKS_TESTED`` (checked once per process)."""
    import deepspeed
    from packaging.version import Version

    low, high = (Version(".".join(map(str, v))) for v in ZERO3_HOOKS_TESTED)
    if not low <= Version(Version(deepspeed.__version__).base_version) < high:
        raise DistillError(f"deepspeed {deepspeed.__version__}: generation with ZeRO-3 takes its private module "
                           f"hooks off, tested with deepspeed >={low},<{high}; install one of those")


@contextmanager
def _zero3_hooks_off(offloads: list[Any]) -> Iterator[None]:
    """ZeRO-3's module hooks off for the block, put back after: the one place distill reaches into
    DeepSpeed's private state (``DeepSpeedZeRoOffload``'s hooks, ``fwd_pre_hook``,
    ``ds_active_sub_modules``, ``_register_deepspeed_module``). Refused, by name, on a DeepSpeed
    outside the tested releases."""
    _check_zero3_hooks_version()
    for offload in offloads:
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
    # The start-of-forward hook of the root module checks, while ZeRO-3 records the order of module
    # calls, that every rank calls alike (collectives): off too, so that ranks decoding different
    # numbers of tokens (or none: a cached batch) cannot fall out of step.
    starts = [offload.module._forward_pre_hooks[offload.fwd_pre_hook.id] for offload in offloads]
    for offload in offloads:
        offload.fwd_pre_hook.remove()
    try:
        yield
    finally:
        for offload, start in zip(offloads, starts, strict=True):
            offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start, prepend=True)
            offload._register_deepspeed_module(offload.module)  # also invalidates the recorded order
