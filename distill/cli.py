"""The ``distill`` command: a Hydra CLI over the recipes in ``recipes/``.

    distill                                  # the embedded default: supervised KD on the built-in tasks
    distill recipe=pretrain_teacher          # how the shipped teacher was made
    distill loss.kind=rkl trainer.steps=500  # any field of distill.config can be overridden
    distill -m loss.kind=fkl,rkl             # a Hydra multirun sweep
    distill resume=outputs/RUN               # continue an interrupted run
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from distill.config import DistillConfig, register
from distill.errors import DistillError

register()

# What may change when a run is resumed: where it runs and how it reports, not what it computes.
RESUME_OVERRIDABLE = ("resume", "trainer.device", "trainer.progress")


def summary_table(test: dict[str, dict[str, float]]) -> Table:
    """Teacher, student before and student after on the test split."""
    keys = sorted({k for row in test.values() for k in row}, key=lambda k: (k != "accuracy", k))
    table = Table(title="test split")
    table.add_column("model")
    for k in keys:
        table.add_column(k.replace("/", "\n"), justify="right")
    for name, row in test.items():
        table.add_row(name, *(f"{row[k]:.3f}" if k in row else "-" for k in keys))
    return table


@hydra.main(version_base=None, config_path="pkg://distill.recipes", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    from distill.train import train

    console = Console()
    try:
        cfg: DistillConfig = OmegaConf.to_object(raw)
        hydra_cfg = HydraConfig.get()
        if cfg.resume is not None:
            fixed = [o for o in hydra_cfg.overrides.task if o.split("=")[0].lstrip("+~") not in RESUME_OVERRIDABLE]
            if fixed:
                raise DistillError(
                    f"resume continues the run's saved config ({cfg.resume}/config.yaml); drop {' '.join(fixed)} "
                    f"(only {', '.join(RESUME_OVERRIDABLE[1:])} may change)"
                )
        run_dir = Path(cfg.output_dir or hydra_cfg.runtime.output_dir)
        result = train(cfg, run_dir)
    except (DistillError, OmegaConfBaseException) as e:
        print(f"distill: error: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    if result.test:
        console.print(summary_table(result.test))
    console.print(f"model: {result.model_dir}\nrun:   {result.run_dir}")


def main() -> None:
    """Console-script entry point."""
    import transformers

    # distill draws its own progress; transformers' per-file loading bars would only clutter it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    _hydra_main()


if __name__ == "__main__":
    main()
