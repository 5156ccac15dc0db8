"""A generation worker: a Ray actor holding a copy of the sources' context (the student, and the
teacher where a source generates with it) that makes a whole step's sequences.

A request names the policy version it samples from and carries, by reference, the context and
that version's weights (fetched only where the worker lacks them), so an answer depends on the
request alone: a worker that Ray restarted after a kill answers a request sent again as before.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from distill.data import Record
from distill.models import load_trainable_state, resolve_device, unpickled
from distill.remote.cluster import ray_module
from distill.sources import REGISTRY
from distill.sources.base import Pairs, Sequences, SourceContext


@dataclass
class Request:
    """A step's generation: its source, and per micro-batch the dataset's pairs, their records and
    the seed; sampled from policy ``version``."""

    step: int
    source: str
    version: int
    micro: list[tuple[Pairs, list[Record], int]]


@dataclass
class Answer:
    """A step's sequences, per micro-batch; the version they were sampled from and a checksum of
    the weights that sampled them; how long the worker waited for the request (its weights) and
    how long it generated; the teacher responses it added to its copy of the teacher cache."""

    sequences: list[Sequences]
    version: int
    checksum: float
    waited: float
    seconds: float
    cached: dict[str, list[int]] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)


def checksum(params: Iterable[torch.Tensor]) -> float:
    """A float64 checksum of trained weights, in their order: two policy versions differ in it (a
    check of which weights sampled a batch, cheap beside generation)."""
    return float(sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(params)))


class GenerationWorker:
    """A worker on the trainer's ``device`` type, with ``threads`` torch threads on the CPU;
    ``paths`` go first on ``sys.path``, so that what the sources' context refers to imports here
    (a reward module in the working directory included)."""

    def __init__(self, paths: list[str], device: str, threads: int) -> None:
        for p in reversed(paths):
            if p not in sys.path:
                sys.path.insert(0, p)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.ctx: SourceContext | None = None
        self.version: int | None = None
        self.idle_since = time.perf_counter()

    def identity(self) -> dict:
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "device": str(self.device)}

    def generate(self, request: Request, refs: list) -> Answer:
        """``request``'s sequences; ``refs`` holds the references of the sources' context
        (cloudpickled, read on a worker's first request) and of the version's weights."""
        started = time.perf_counter()
        ray = ray_module()
        if self.ctx is None:
            self.ctx = pickle.loads(ray.get(refs[0]))
            unpickled(self.ctx.student, None if self.ctx.teacher is None else self.ctx.teacher.module)
        if self.version != request.version:
            load_trainable_state(self.ctx.student, ray.get(refs[1]), "a generation worker")
            self.version = request.version
        source = REGISTRY[request.source]
        out = [source.sequences(pairs, self.ctx, step=request.step, seed=seed, records=records)
               for pairs, records, seed in request.micro]
        done = time.perf_counter()
        held = checksum(p for p in self.ctx.student.parameters() if p.requires_grad)
        cache = self.ctx.teacher_cache
        answer = Answer(out, self.version, held, started - self.idle_since, done - started,
                        cache.take_new() if cache is not None else {})
        self.idle_since = done
        return answer
