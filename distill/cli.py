"""The ``distill`` command: a Hydra CLI over the recipes in ``recipes/``.

    distill                                  # the embedded default: supervised KD on the built-in tasks
    distill recipe=pretrain_teacher          # how the shipped teacher was made
    distill loss.kind=rkl trainer.steps=500  # any field of distill.config can be overridden
    distill -m loss.kind=fkl,rkl             # a Hydra multirun sweep
    distill resume=outputs/RUN               # continue an interrupted run

Two more commands take ``key=value`` options of their typed configs:

    distill eval-draft draft=DIR target=DIR gammas=[1,2,4] out=DIR   # DistillSpec metrics of a draft
    distill export-draft student=DIR target=DIR out=DIR num_assistant_tokens=5
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
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


@dataclass
class ExportDraftConfig:
    """``distill export-draft`` options."""

    student: str = MISSING
    target: str = MISSING
    out: str = MISSING
    num_assistant_tokens: int = 5


def _subcommand(name: str, args: list[str]) -> None:
    """``eval-draft`` and ``export-draft``: typed configs from ``key=value`` arguments."""
    from distill.draft_eval import DraftEvalConfig, evaluate_draft
    from distill.export import export_draft

    schema = DraftEvalConfig if name == "eval-draft" else ExportDraftConfig
    console = Console()
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(args)))
        if name == "export-draft":
            done = export_draft(cfg.student, cfg.target, cfg.out, num_assistant_tokens=cfg.num_assistant_tokens)
            console.print(f"draft written to {done.out_dir} (vocab {done.vocab_size}, {done.padded_rows} rows padded)",
                          soft_wrap=True, markup=False)
            print(done.usage())  # plain print: a snippet to copy must not be wrapped
        else:
            result = evaluate_draft(cfg)
            console.print(Path(cfg.out, "draft_eval.md").read_text(), markup=False)
            console.print(f"alpha {result['alpha']:.3f}; results in {cfg.out}/draft_eval.{{json,md,png}}")
    except (DistillError, OmegaConfBaseException, ValueError) as e:
        print(f"distill: error: {name}: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    import transformers

    # distill draws its own progress; transformers' per-file loading bars would only clutter it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if len(sys.argv) > 1 and sys.argv[1] in ("eval-draft", "export-draft"):
        _subcommand(sys.argv[1], sys.argv[2:])
        return
    _hydra_main()


if __name__ == "__main__":
    main()
