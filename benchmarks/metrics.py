"""The gated metrics every suite member returns beside its own result files.

A metric is a value with the direction that is better and its kind: ``quality`` (accuracy,
divergence, acceptance, numerical error), ``ratio`` (a time measured against a baseline in the same
run) or ``memory`` (a peak measured against a baseline in the same run). Absolute times are never
gated: on a shared 2-core machine they say more about the neighbours than about the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.checkpoint import atomic_write_text

KINDS = ("quality", "ratio", "memory")


def metric(value: float, better: str, kind: str, floor: float | None = None) -> dict:
    """One gated metric; ``better`` is ``higher`` or ``lower``. ``floor``: the smallest tolerance the
    gate may give it, the resolution below which a change means nothing (one test example of 200
    in an accuracy; float32 rounding in an error); by default 2% of the value for ratios and
    memory, 0 for quality."""
    if better not in ("higher", "lower") or kind not in KINDS:
        raise ValueError(f"metric: better must be higher or lower and kind one of {KINDS}; got {better}, {kind}")
    if floor is None:
        floor = 0.02 * abs(value) if kind != "quality" else 0.0
    return {"value": float(value), "better": better, "kind": kind, "floor": float(floor)}


def write_json(path: Path, obj: object) -> None:
    """``obj`` as indented JSON, written atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB (``distill.memory.peak_rss_bytes``). Not
    ``getrusage``'s ru_maxrss, which on Linux keeps the peak of the process image before ``exec``:
    a child of a large parent would report the parent's."""
    from distill.memory import peak_rss_bytes

    peak = peak_rss_bytes()
    if not peak:
        raise RuntimeError("no VmHWM in /proc/self/status")
    return peak / 2**20


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a clock read measures it (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
