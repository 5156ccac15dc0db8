"""Metrics of a run: a JSONL file (the record), TensorBoard (to watch) and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only ``metrics.jsonl`` plus TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: it will be logged again.
            kept = [r for r in self.read(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
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
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Training loss and validation metrics against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog.read(metrics_path)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    if not train:
        return None
    val_keys = [k for k in ("accuracy", "chrf", "bleu", "rouge_l", "divergence", "ce") if any(k in r for r in val)]
    panels = [("train", "loss")] + [("validation", k) for k in val_keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (split, key) in zip(axes[0], panels, strict=True):
        rows = [r for r in (train if split == "train" else val) if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="" if split == "train" else "o")
        ax.set_title(f"{split} {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
