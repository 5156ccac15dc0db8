"""Metrics of a run: a JSONL file (the record), TensorBoard (to watch) and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distill.checkpoint import atomic_write_text

# Metrics that measure time: two runs of one config differ in these alone.
WALL_CLOCK = ("tokens_per_s", "train_seconds", "wall_seconds", "gen_seconds", "gen_tokens_per_s", "wait_samples_s",
              "wait_weights_s")


class MetricsLog:
    """Append-only ``metrics.jsonl`` plus TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: it will be logged again.
            # A run killed mid-write leaves a torn last line; it is after the checkpoint too.
            kept = [r for r in self.read(self.path, torn_tail=True) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        record = {"split": split, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self._tb.close()

    @staticmethod
    def read(path: Path, torn_tail: bool = False) -> list[dict[str, Any]]:
        """The records of ``path``; with ``torn_tail`` a last line cut short by a kill is left out."""
        text = Path(path).read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        if torn_tail and lines and not text.endswith("\n"):
            lines.pop()
        return [json.loads(line) for line in lines]


# Training keys of generating steps only. An interval without generation spent 0 s generating;
# the others are undefined there and leave a gap, so that no line is drawn across dataset steps.
ZERO_WITHOUT_GENERATION = ("gen_seconds",)


def series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` in the ``split`` rows, as ``plot_curves`` draws them: validation
    where measured; training at every logged step, 0 or NaN (a gap) where the interval lacks it."""
    rows = [r for r in records if r["split"] == split]
    if split != "train":
        rows = [r for r in rows if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]
    fill = 0.0 if key in ZERO_WITHOUT_GENERATION or key.startswith("source_") else math.nan
    return [r["step"] for r in rows], [r.get(key, fill) for r in rows]


def _panel_name(lines: list[tuple[str, str]]) -> str:
    if lines[0][1].startswith("source_"):
        return "share of steps by source"
    if lines[0][0] == "policy":
        return "waits (s): trainer for samples, workers for weights"
    return "accuracy: greedy and sampled" if lines[0][1] == "accuracy" else "seconds per log interval"


def curve_panels(records: list[dict[str, Any]]) -> list[list[tuple[str, str]]]:
    """The panels of ``plot_curves``, each a list of (split, key) lines: training loss and
    validation metrics (greedy accuracy beside sampled mean@n and pass@n where ``eval.samples`` is
    set); for generating recipes also the sources drawn, generation and training time, response
    length, SKD acceptance, teacher forwards per generated token and the reward's mean; generated
    ahead (``sources.asynchronous``), each batch's staleness and the waits for samples and for
    weights."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    val_keys = [k for k in ("accuracy", "chrf", "bleu", "rouge_l", "divergence", "ce") if any(k in r for r in val)]
    # Panels of generating recipes: what each step drew, generation against training time, and
    # what the generated sequences were like.
    sources = [k for k in train[0] if k.startswith("source_") and any(r.get(k) for r in train)] if train else []
    gen_keys = [k for k in ("response_length", "skd_acceptance", "teacher_forwards_per_token", "reward_mean")
                if any(k in r for r in train)]
    # Sampled evaluation (headline names, not per task): beside the greedy accuracy in one panel.
    sampled = sorted({k for r in val for k in r if "/" not in k and k.split("@")[0] in ("mean", "pass")})
    panels = [[("train", "loss")]] + [[("validation", k), *(("validation", m) for m in sampled)]
                                      if k == "accuracy" and sampled else [("validation", k)] for k in val_keys]
    if len(sources) > 1:
        panels.append([("train", k) for k in sources])
    if any("gen_seconds" in r for r in train):
        panels.append([("train", "train_seconds"), ("train", "gen_seconds")])
    panels += [[("train", k)] for k in gen_keys]
    if any(r["split"] == "policy" for r in records):  # generated ahead: each batch's policy, and the waits
        panels += [[("policy", "staleness")], [("policy", "wait_samples_s"), ("policy", "wait_weights_s")]]
    return panels


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """The run's curves (``curve_panels``) against step, as a PNG; None before any training row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog.read(metrics_path)
    if not any(r["split"] == "train" for r in records):
        return None
    panels = curve_panels(records)
    cols = min(len(panels), 4)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, lines in zip(axes.flat, panels, strict=False):
        for split, key in lines:
            ax.plot(*series(records, split, key), marker="o" if split == "validation" else "",
                    label=key.removeprefix("source_"))
        ax.set_title(f"{lines[0][0]} {lines[0][1] if len(lines) == 1 else _panel_name(lines)}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
