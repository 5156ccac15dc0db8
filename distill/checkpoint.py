"""Atomic checkpoints and exports: a directory appears complete under its final name, or not at all."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import DistillError

CHECKPOINT_PREFIX = "step-"


@contextmanager
def atomic_dir(final: Path, fsync_files: bool = True) -> Iterator[Path]:
    """Yield a scratch directory beside ``final``; on success it is fsynced and renamed into place
    (``fsync_files=False``: its files were fsynced by their writers, the directories are here)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        os.replace(old, final)  # a crash between the two renames below: the old copy is the good one
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = current_umask()
    try:
        yield tmp
        # mkdtemp (and some writers) create private files: give the result ordinary permissions.
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
            if f.is_file() and fsync_files:
                fsync_file(f)
        fsync_dir(tmp)
        if final.exists():
            # Move the old copy aside first so that a crash never leaves neither.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that it holds the old content or the new, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], keep: int
) -> Path:
    """Write ``checkpoints/step-N`` (trainable weights + trainer state) atomically; keep the newest ``keep``."""
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "trainer_state.pt")
    prune_checkpoints(run_dir, keep)
    return final


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def load_latest_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Weights and trainer state of the newest complete checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    latest = ckpts[-1]
    try:
        weights = load_file(str(latest / "weights.safetensors"))
        state = torch.load(latest / "trainer_state.pt", weights_only=False)
    except Exception as e:  # a damaged file must not be half-loaded
        raise DistillError(f"resume: cannot read checkpoint {latest}: {e}") from None
    return weights, state


def export_model(out_dir: Path, save: Callable[[Path], None]) -> Path:
    """Run ``save(tmp_dir)`` (e.g. save_pretrained) and move the result to ``out_dir`` atomically."""
    with atomic_dir(Path(out_dir)) as tmp:
        save(tmp)
    return Path(out_dir)
