"""The parts of a served teacher that need no Ray cluster: when the trainer asks a step ahead
(``remote.teacher.overlaps``), when a worker waits for other callers' requests, and the setting
every distill process makes for torch's OpenMP threads."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import torch

import distill.remote.worker as worker_mod
from distill.remote.teacher import overlaps
from distill.remote.worker import TeacherWorker

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("setting, device, worker, node, want", [
    (None, CPU, {"device": "cpu", "node": "a"}, "a", False),  # one machine's cores: take turns
    (None, CPU, {"device": "cpu", "node": "b"}, "a", True),  # another machine's
    (None, CPU, {"device": "cuda:0", "node": "a"}, "a", True),  # the worker's own device
    (None, CUDA, {"device": "cpu", "node": "a"}, "a", True),  # the trainer's own device
    (True, CPU, {"device": "cpu", "node": "a"}, "a", True),  # as set
    (False, CUDA, {"device": "cuda:1", "node": "b"}, "a", False),
])
def test_a_served_teacher_is_asked_ahead_unless_it_shares_the_trainers_cores(setting, device, worker, node, want):
    assert overlaps(setting, device, worker, node) is want


def test_a_worker_waits_for_other_callers_only_while_there_are_others(teacher_dir, monkeypatch):
    """A trainer alone gets each forward at once; once a second caller has asked (ranks, a sweep)
    a forward waits ``BATCH_WINDOW`` for the others' requests, until that caller has been quiet
    for ``CALLERS_SEEN`` seconds."""
    worker = TeacherWorker(str(teacher_dir), None, "float32", "cpu", threads=1)
    assert worker.identity()["node"] is None  # not in a Ray cluster
    waits, clock = [], [1000.0]
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(worker_mod.asyncio, "sleep", sleep)
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    ids = torch.tensor([[1, 5, 6, 7]])
    request = (ids, torch.ones_like(ids), torch.ones(1, 3, dtype=torch.bool), False, "float32")

    def ask(*callers):
        async def together():
            return await asyncio.gather(*(worker.forward(*request, c) for c in callers))
        waits.clear()
        got = asyncio.run(together())
        assert all(g.shape == (3, 48) for g in got)
        return len(waits)

    assert ask("trainer") == 0 and ask("trainer") == 0
    assert ask("trainer", "rank 1") == 1  # both in one forward, after the window
    assert worker.stats["forwards"] == 3 and worker.stats["requests"] == 4 and worker.stats["forward_seconds"] > 0
    assert ask("trainer") == 1  # rank 1 asked lately
    clock[0] += worker_mod.CALLERS_SEEN
    assert ask("trainer") == 0  # and has been quiet since


def test_distill_shortens_openmp_spinning_unless_the_user_set_it():
    code = "import distill, os, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == "10000"
    mine = subprocess.run(run, env=env | {"GOMP_SPINCOUNT": "5"}, capture_output=True, text=True, check=True)
    assert mine.stdout.strip() == "5"
