"""One gloo rank of tests/test_distributed.py's checkpoint check: ``python tests/two_rank_checkpoint.py
PORT RANK DIR``. Both ranks save a ZeRO-3 checkpoint, each fsyncing its own files (together all of
them); the SeqKD cache's new entries reach rank 0 only, once. Then rank 1 cannot write its part of
the next checkpoint: every rank must stop with the same one-line error at once (no rank waits at a
barrier), with no directory of the failed step and the first checkpoint intact; rank 0 prints
"clean"."""
import os
import sys
from pathlib import Path

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK=sys.argv[2], WORLD_SIZE="2",
                  LOCAL_RANK=sys.argv[2], DS_ACCELERATOR="cpu")
import torch  # noqa: E402

import distill.distributed as distributed  # noqa: E402
from distill.config import ASSETS, DistillConfig, ModelConfig, TeacherConfig  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.models import load_model  # noqa: E402

rank, run_dir = int(sys.argv[2]), Path(sys.argv[3])
cfg = DistillConfig(teacher=TeacherConfig(), student=ModelConfig(path=str(ASSETS / "student")))
cfg.deepspeed.stage, cfg.trainer.batch_size = 3, 2
engine = distributed.Engine(cfg, torch.device("cpu"))
with engine.loading("student"):
    student = load_model(cfg.student, "student", torch.device("cpu"))
optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
student = engine.wrap_student(student, optimizer)
synced = []
real_fsync = distributed.fsync_file
distributed.fsync_file = lambda f: synced.append(f.name) or real_fsync(f)
engine.save_checkpoint(run_dir, 1, student, {"step": 1}, keep=3)
# Each rank fsynced its own files, and together every file of the checkpoint.
everyone = engine.all_gather(sorted(synced))
files = sorted(f.name for f in (run_dir / "checkpoints" / "step-0000001").rglob("*") if f.is_file())
assert not set(everyone[0]) & set(everyone[1]) and sorted(everyone[0] + everyone[1]) == files, (everyone, files)
assert f"rng-{rank}.pt" in everyone[rank] and any(f"zero_pp_rank_{rank}_" in n for n in everyone[rank])
# The SeqKD cache's new entries go to rank 0 only, each once.
from distill.config import SamplingConfig  # noqa: E402
from distill.sources.teacher_cache import TeacherCache  # noqa: E402

cache = TeacherCache(run_dir / "cache", ASSETS / "teacher", SamplingConfig(greedy=True), stops=[3], vocab=320,
                     dtype="float32")
cache.store([[rank, 5]], 0, [[7, 3]], [[rank, 5]])
got = engine.gather(cache.take_new())
assert (len(got) == 2 and all(len(g) == 1 for g in got) and got[0] != got[1]) if rank == 0 else got is None, got
assert engine.gather(cache.take_new()) in ([{}, {}], None)  # nothing new since
if rank == 1:  # this rank's disk is full
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith(f"rng-{rank}.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    distributed.torch.save = full
try:
    engine.save_checkpoint(run_dir, 2, student, {"step": 2}, keep=3)
    print("saved")
except DistillError as e:
    message = str(e)
    assert "checkpoint step 2: rank 1 could not write its part (OSError" in message, message
    engine.barrier()  # rank 0 has removed the failed step's scratch directory
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == ["step-0000001"], left
    if rank == 0:
        print("clean")
