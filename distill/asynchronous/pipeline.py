"""The trainer's side of asynchronous generation: ``Pipeline`` plans each step ahead (its source,
the dataset's prompts, the seeds) and has a worker generate it from policy version
max(step - staleness, 0), the student after that many optimizer steps.

After step t - 1 the trainer holds version t, the newest that exists: it sends step t + s, whose
version that is, so a worker generates step t + s while the trainer validates, saves and trains
steps t .. t + s - 1. With s = 0 the trainer waits for each step's samples (the synchronous
engine, through a worker). A checkpoint after step t - 1 keeps the sequences of the steps sent
(t .. t + s), which a resumed run could not make again from the saved weights, and the data's
position where their prompts end.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from distill.asynchronous.worker import Answer, GenerationWorker, Request, checksum
from distill.config import DistillConfig
from distill.data import TrainData
from distill.errors import DistillError
from distill.models import picklable, trainable_state
from distill.remote.cluster import RESTARTS, init, ray_module
from distill.sources import REGISTRY
from distill.sources.base import Sequences, SourceContext
from distill.sources.mixture import draw_source, step_seed


@dataclass
class Made:
    """A step's sequences as the loop takes them, with how they were made: the policy version, the
    checksums of the weights that sampled them and of the trainer's weights now (version = step),
    how long the trainer waited for them and the worker for its request."""

    sequences: list[Sequences]
    version: int | None  # None: a dataset step (no policy sampled it)
    policy_checksum: float | None  # None for a dataset step, as the version
    weights_checksum: float | None
    waited_samples: float
    waited_weights: float

    def row(self, step: int) -> dict[str, float]:
        """The step's row of the metrics log (split "policy")."""
        return {"policy_version": self.version, "staleness": step - self.version,
                "wait_samples_s": self.waited_samples, "wait_weights_s": self.waited_weights,
                "policy_checksum": self.policy_checksum, "weights_checksum": self.weights_checksum}


class Pipeline:
    """Generation ahead of the trainer, ``staleness`` steps, by ``sources.asynchronous.workers``
    Ray actors (round-robin by step). ``start`` them, ``take`` each step's sequences in order;
    ``advance`` after each optimizer step (the workers start on what the new weights make ready);
    ``state_dict`` for a checkpoint (it waits for the steps sent ahead), ``close`` at the end."""

    def __init__(self, cfg: DistillConfig, ctx: SourceContext, data: TrainData, device: torch.device) -> None:
        self.cfg, self.ctx, self.data, self.device = cfg, ctx, data, device
        self.staleness = cfg.sources.asynchronous.staleness
        self.workers: list = []
        self.sent: dict[int, tuple[Request, Any]] = {}  # step: its request and the answer's reference
        # Steps planned ahead and not sent: answers (from a checkpoint) and dataset steps' requests.
        self.ready: dict[int, Answer | Request] = {}
        self.planned = 0  # steps planned so far (their prompts taken from the data)
        self.weights: tuple[int, Any, float] | None = None  # the newest version, its reference and checksum
        self.context = None  # the reference of the workers' context

    def start(self, step: int, saved: dict | None = None) -> None:
        """Start the workers; the run stands at ``step``, and ``saved`` (a checkpoint's
        ``state_dict``) holds the steps it had planned ahead."""
        a = self.cfg.sources.asynchronous
        ray = init(a.address, start=True)
        kind = "GPU" if self.device.type == "cuda" else "CPU"
        need = 1 if kind == "GPU" else a.threads
        free = ray.available_resources().get(kind, 0)
        if free < need * a.worker_count:  # Ray would wait for them without end
            raise DistillError(f"sources.asynchronous.workers={a.worker_count} need {need:g} {kind} each; the Ray "
                               f"cluster has {free:g} free (lower the workers or threads, or add nodes)")
        resources = {"num_gpus": 1, "num_cpus": 0} if kind == "GPU" else {"num_cpus": a.threads}
        actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS, **resources)(GenerationWorker)
        generating = [REGISTRY[n] for n in self.cfg.sources.weights if not REGISTRY[n].fixed]
        # A worker's context: the teacher only where a source generates with it. The teacher cache
        # goes as it is now; the responses a worker adds come back with its answers (the trainer
        # saves the cache).
        ctx = dataclasses.replace(self.ctx,
                                  teacher=self.ctx.teacher if any(s.needs_teacher for s in generating) else None)
        # Sent with every request (a reference): a worker reads it on its first, and again after a restart.
        teacher = None if ctx.teacher is None else ctx.teacher.module
        with picklable(ctx.student, teacher):
            self.context = ray.put(ray.cloudpickle.dumps(ctx))
        paths = [os.getcwd(), *sys.path]
        self.workers = [actor.remote(paths, self.device.type, a.threads) for _ in range(a.worker_count)]
        try:
            ray.get([w.identity.remote() for w in self.workers])
        except ray.exceptions.RayError as e:
            raise DistillError(f"sources.asynchronous: a generation worker failed to start: "
                               f"{str(e).splitlines()[0]}") from None
        self.ready = dict(saved["ready"]) if saved else {}
        self.planned = max(self.ready, default=step - 1) + 1

    def advance(self, version: int) -> None:
        """The trainer holds policy version ``version`` now (after that many optimizer steps): send
        the steps it makes ready, up to ``version + staleness``."""
        while self.planned <= min(version + self.staleness, self.cfg.trainer.steps - 1):
            self._send(self.planned, version)

    def take(self, step: int) -> Made:
        """Step ``step``'s sequences (the trainer holds policy version ``step``, the newest)."""
        self.advance(step)
        t0 = time.perf_counter()
        got = self.ready.pop(step) if step in self.ready else self._get(self.sent.pop(step)[1])
        waited = time.perf_counter() - t0
        if isinstance(got, Request):  # a dataset step: its pairs as they are, made here
            source = REGISTRY[got.source]
            made = [source.sequences(pairs, self.ctx, step=step, seed=seed, records=records)
                    for pairs, records, seed in got.micro]
            return Made(made, None, None, None, 0.0, 0.0)
        if got.cached and self.ctx.teacher_cache is not None:
            self.ctx.teacher_cache.merge(got.cached)
        # The trainer's weights now (version ``step``): pushed already where a step was sent from them.
        now = self.weights[2] if self.weights is not None and self.weights[0] == step else checksum(
            p for p in self.ctx.student.parameters() if p.requires_grad)
        return Made(got.sequences, got.version, got.checksum, now, waited, got.waited)

    def _push(self, version: int) -> None:
        """The trainer's weights now, as policy version ``version``, into the object store (a
        request sent holds its version's reference for as long as Ray may send it again)."""
        if self.weights is None or self.weights[0] != version:
            params = trainable_state(self.ctx.student)
            self.weights = (version, ray_module().put(params), checksum(params.values()))

    def _send(self, step: int, version: int) -> None:
        """Plan step ``step`` (its source, and per micro-batch the dataset's prompts as the
        synchronous loop takes them, and the seed) and send it to a worker with the trainer's
        weights (policy ``version``), or keep it where it generates nothing."""
        tc = self.cfg.trainer
        name = draw_source(self.cfg.sources.weights, tc.seed, step, tc.steps)
        micro = []
        for m in range(tc.grad_accum):
            pairs, records = self.data.next_examples(REGISTRY[name].prompts(self.ctx, tc.batch_size))
            micro.append((pairs, records, step_seed(tc.seed, step, m)))
        self.planned = step + 1
        request = Request(step, name, max(step - self.staleness, 0), micro)
        if REGISTRY[name].fixed:
            self.ready[step] = request
            return
        assert request.version == version, (step, request.version, version)
        self._push(version)  # only a step that generates needs the weights
        worker = self.workers[step % len(self.workers)]
        self.sent[step] = (request, worker.generate.remote(request, [self.context, self.weights[1]]))

    def _get(self, ref) -> Answer:
        """A worker's answer; its DistillError (a reward function's, say) as raised here."""
        ray = ray_module()
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DistillError):
                raise DistillError(str(e.cause)) from None
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise DistillError(f"sources.asynchronous: a generation worker died and did not come back "
                               f"({type(e).__name__}); resume the run from its last checkpoint") from None

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the steps planned ahead, with the answers of those sent (waited
        for here)."""
        for step, (_, ref) in sorted(self.sent.items()):
            self.ready[step] = self._get(ref)
        self.sent = {}
        return {"ready": dict(self.ready)}

    def close(self) -> None:
        ray = ray_module()
        for w in self.workers:
            ray.kill(w)
        self.workers = []
