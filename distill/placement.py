"""Where a run's models live: one ``Placement``, computed from the config and the world size.

``distill.distributed.Engine`` places the models by it and ``distill.plan`` plans memory by it, so
the plan cannot disagree with what the engine does (the plan also tries the other ZeRO stages:
``with_stage``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from distill.config import DistillConfig, TeacherConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def head_only(t: TeacherConfig) -> bool | None:
    """Whether the trainer holds ``t``'s LM head alone (read from a cache, or served); None without a teacher."""
    if not t.path:
        return None
    return bool(t.cache) and not t.live or bool(t.remote)


@dataclass(frozen=True)
class Placement:
    """ZeRO stage and world, what is sharded and offloaded, dtypes, and the device type."""

    world: int
    stage: int
    device: str  # "cuda" or "cpu"
    student_dtype: str
    teacher_dtype: str
    # deepspeed.shard_teacher: a teacher beside a stage below 3 sharded anyway (ZeRO-3 inference).
    shard_teacher_asked: bool = True
    offload_optimizer_asked: bool = False
    offload_params_asked: bool = False
    # A teacher with weights of its own to place (not none, not the student's base weights, not
    # read from an offline cache alone).
    own_teacher: bool = False
    # The teacher is read from an offline cache (teacher.cache) or served (teacher.remote): this
    # process holds its LM head only.
    teacher_head_only: bool = False

    @classmethod
    def of(cls, cfg: DistillConfig, world: int, device: str | None = None) -> Placement:
        """The placement of ``cfg`` on ``world`` ranks (``device``: default from trainer.device)."""
        ds = cfg.deepspeed
        # Several teachers: weights of their own where any is loaded here, else their LM heads alone.
        teachers = list(cfg.teachers.values()) or [cfg.teacher]
        return cls(world=world, stage=ds.stage, device=device or device_type(cfg.trainer.device),
                   student_dtype=cfg.student.dtype, teacher_dtype=teachers[0].dtype,
                   shard_teacher_asked=ds.shard_teacher, offload_optimizer_asked=ds.offload_optimizer,
                   offload_params_asked=ds.offload_params,
                   own_teacher=any(head_only(t) is False and not t.student_base for t in teachers),
                   teacher_head_only=all(head_only(t) for t in teachers))

    def with_stage(self, stage: int, offload: bool = False) -> Placement:
        """The same run at another ZeRO stage, with or without offload (the plan's comparison)."""
        return dataclasses.replace(self, stage=stage, offload_optimizer_asked=offload, offload_params_asked=offload)

    @property
    def uses_deepspeed(self) -> bool:
        return self.world > 1 or self.stage > 0

    @property
    def shard_student(self) -> bool:
        return self.stage == 3

    @property
    def shard_teacher(self) -> bool:
        """The teacher's own weights are ZeRO-3 partitioned (inference only, no optimizer state)."""
        return self.uses_deepspeed and self.own_teacher and (
            self.stage == 3 or (self.shard_teacher_asked and self.world > 1))

    @property
    def offload_optimizer(self) -> bool:
        return self.offload_optimizer_asked and self.stage > 0

    @property
    def offload_params(self) -> bool:
        return self.offload_params_asked and self.stage == 3

    def sharded(self, role: str) -> bool:
        """Whether the weights ``role`` (student, teacher) computes with are partitioned; a teacher
        that is the student's base is placed as the student; a cached teacher's head is whole."""
        if role == "teacher" and self.teacher_head_only:
            return False
        if role == "student" or not self.own_teacher:
            return self.shard_student
        return self.shard_teacher

    @property
    def name(self) -> str:
        if not self.stage and self.world == 1:
            return "none"
        return f"zero{self.stage}" + ("_offload" if self.offload_optimizer or self.offload_params else "")


def device_type(name: str) -> str:
    """``cuda`` or ``cpu`` for a trainer.device (``auto``: CUDA when there is one)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as ``deepspeed`` and ``torchrun`` set them; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(
        os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this machine (torchrun: LOCAL_WORLD_SIZE, deepspeed: LOCAL_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE", "1"))
