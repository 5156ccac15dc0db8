"""The ``distill`` command: a Hydra CLI over the recipes in ``recipes/``.

    distill                                  # the embedded default: supervised KD on the built-in tasks
    distill recipe=pretrain_teacher          # how the shipped teacher was made (then
                                             # recipe=pretrain_teacher_stage2)
    distill loss.kind=rkl trainer.steps=500  # any field of distill.config can be overridden
    distill -m loss.kind=fkl,rkl             # a Hydra multirun sweep
    distill resume=outputs/RUN               # continue an interrupted run
    distill plan deepspeed=zero3 plan.world_size=8   # the run's plan and per-rank memory, nothing loaded
    distill cache-teacher teacher.cache=DIR  # the teacher over the run's data, once; then train with
                                             # teacher.cache=DIR: no teacher forward (distill.offline)
    distill serve-teacher teacher.remote=NAME teacher.path=DIR   # the teacher served on Ray; then
                                             # train with teacher.remote=NAME (distill.remote)
    deepspeed --num_gpus 8 --module distill deepspeed=zero3 ...   # or torchrun --nproc-per-node 8 -m distill

Two more commands take ``key=value`` options of their typed configs:

    distill eval-draft draft=DIR target=DIR gammas=[1,2,4] out=DIR   # DistillSpec metrics of a draft
    distill export-draft student=DIR target=DIR out=DIR num_assistant_tokens=5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.resources
import io
import os
import re
import shutil
import sys
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, QuotedString, ValueType
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.table import Table

from distill.config import DistillConfig, register
from distill.errors import DistillError
from distill.memory import fmt
from distill.progress import make_console

register()

# What may change when a run is resumed: where it runs, how it reports, and how long it trains
# (trainer.steps may be raised: a finished run is extended), not what it computes.
RESUME_OVERRIDABLE = ("resume", "trainer.device", "trainer.progress", "trainer.steps")

def _fail(message: object) -> typing.NoReturn:
    """The CLI's report of bad input: one line on stderr, exit code 2."""
    print(f"distill: error: {message}".splitlines()[0], file=sys.stderr)
    sys.exit(2)


def summary_table(rows: dict[str, dict[str, float]], split: str) -> Table:
    """Teacher, student before and student after on a split (the report's order of columns)."""
    from distill.report import columns

    keys = columns(rows)
    table = Table(title=f"{split} split")
    table.add_column("model")
    for k in keys:
        table.add_column(k.replace("/", "\n"), justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[k]:.3f}" if k in row else "-" for k in keys))
    return table


def _config_groups() -> dict[str, list[str]]:
    """The config groups of ``distill.recipes`` (its folders; nested ones as ``a/b``) and their options
    (the YAML files in each), as installed."""
    groups: dict[str, list[str]] = {}
    todo = [("", importlib.resources.files("distill.recipes"))]
    while todo:
        prefix, folder = todo.pop()
        for child in folder.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")):
                groups[prefix + child.name] = sorted(c.name[:-5] for c in child.iterdir() if c.name.endswith(".yaml"))
                todo.append((f"{prefix}{child.name}/", child))
    return groups


def _schema_keys(cls: type = DistillConfig, prefix: str = "") -> dict[str, object]:
    """Every dotted key of the typed config and its type, through nested dataclasses (optional ones too)."""
    keys: dict[str, object] = {}
    for name, hint in typing.get_type_hints(cls).items():
        keys[prefix + name] = hint
        if typing.get_origin(hint) in (list, dict):  # its entries are OmegaConf's to judge
            continue
        sub = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if sub is not None:
            keys.update(_schema_keys(sub, f"{prefix}{name}."))
    return keys


def _type_name(hint: object) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    if args:  # X | None
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _unknown_key(o: Override, keys: dict[str, object], groups: dict[str, list[str]]) -> str | None:
    """Why ``o``'s key is not in the typed config, naming the closest keys; None where it is (or may be)."""
    key = o.key_or_group
    parent = key.rpartition(".")[0]
    ancestors = [key[:i] for i in range(len(key)) if key[i] == "."]
    # trainer.betas.0, sources.weights.student.start: entries of a list or dict are OmegaConf's to judge.
    if key in keys or any(typing.get_origin(keys.get(a)) in (list, dict) for a in ancestors):
        return None
    message = f"{o.input_line}: {key} is not a key of the config"
    if parent in keys and not any(k.startswith(parent + ".") for k in keys):
        message += f" ({parent} is a value of type {_type_name(keys[parent])}, not a section)"
    sections = {k.rpartition(".")[0] for k in keys}
    if parent in sections:  # a mistyped last part: the closest keys beside it, else all of them
        siblings = list(dict.fromkeys([k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
                                      + ([] if parent else [*groups])))
        close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(key.rpartition(".")[2], siblings)]
    else:
        names = [k for k in dict.fromkeys([*keys, *groups]) if not (k in sections and key.startswith(k + "."))]
        close = difflib.get_close_matches(key, names)
        siblings = list(dict.fromkeys([k for k in keys if "." not in k] + [*groups]))
    if close:
        return f"{message}; did you mean {' or '.join(close)}?"
    return f"{message}; the keys {f'of {parent} ' if parent in sections and parent else ''}are {', '.join(siblings)}"


def _composition_error(e: Exception, overrides: list[Override], keys: dict[str, object],
                       groups: dict[str, list[str]]) -> str:
    """One line for an error of Hydra's composition: the override, OmegaConf's message, the key's type."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if not isinstance(e, HydraException):  # OmegaConf cannot set a field of a null sub-config (student.arch)
        nullable = [k for k, t in keys.items()
                    if type(None) in typing.get_args(t) and any(map(dataclasses.is_dataclass, typing.get_args(t)))]
        for o in overrides:
            k = next((k for k in nullable if o.key_or_group == k or o.key_or_group.startswith(k + ".")), None)
            if k is not None:
                top = k.split(".")[0]
                return (f"{o.input_line}: {k} is null in this config, so its fields cannot be set; select a {top} "
                        f"option that sets it ({top}=...: {', '.join(groups.get(top, []))})")
    lines = [ln.strip() for ln in str(cause).splitlines()]
    lines = [ln for ln in lines if ln and not re.match(r"(full_key|reference_type|object_type)\b", ln)]
    lines = lines[: next((i for i, ln in enumerate(lines) if ln.startswith("Config search path")), None)]
    message = " ".join(lines) or type(cause).__name__
    culprit = next((o for o in overrides if o.input_line and o.input_line in str(e)), None)
    key = re.sub(r"\[\d+\]$", "", str(getattr(cause, "full_key", None) or ""))
    if key in keys and not any(k.startswith(key + ".") for k in keys) and not (culprit and culprit.is_delete()):
        message += f" ({key} takes {_type_name(keys[key])})"
    return f"{culprit.input_line}: {message}" if culprit and culprit.input_line not in message else message


def _check_overrides(argv: list[str]) -> tuple[argparse.Namespace, list[Override]] | None:
    """Check the command line before Hydra runs, so that a mistake is one line (a DistillError), and
    return it parsed: Hydra's arguments and the overrides (None where the check is skipped).

    A config group's option must be one of the group's YAML files in ``distill.recipes``, and any other
    key a field of ``DistillConfig`` (the closest keys or options are named), also as ``+key`` or
    ``++key`` (OmegaConf would keep an unknown added key and the run would ignore it). Hydra's own
    overrides (``hydra.*``, ``hydra/...``) and ``~key`` are Hydra's to judge. Then
    the config is composed once (each ``-m`` sweep at its first value; all swept values were checked)
    and any remaining error (a wrong type, ...) becomes one line. Hydra's flags (``--help``, ``--info``,
    ``-cn``, ``-cd``, ...) skip the check.
    """
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            args = get_args_parser().parse_args(argv)
        except SystemExit:  # --version, or a usage error: Hydra reports it
            return None
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_name
            or args.config_dir or args.experimental_rerun or any(o.startswith("hydra.searchpath") for o in argv)):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        reason = next((ln for ln in e.message.splitlines() if not ln.startswith(("Error parsing", "See "))), "")
        raise DistillError(f"cannot parse the override {e.override!r}: {reason.strip()}") from None
    groups, keys = _config_groups(), _schema_keys()
    composed = []
    for o in overrides:
        if o.is_hydra_override():
            continue
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP or o.is_interval_sweep():
            values = []
        elif o.is_sweep_override():
            values = [v.text if isinstance(v, QuotedString) else v for v in o.sweep_iterator()]
        else:
            values = [o.value()]
        key = o.key_or_group
        if not o.is_delete() and (key in groups or "/" in key):
            if key not in groups:
                raise DistillError(f"{o.input_line}: no config group {key}; the groups are {', '.join(groups)}")
            for option in (x for v in values for x in (v if isinstance(v, list) else [v])):
                if isinstance(option, str) and option not in groups[key]:
                    close = difflib.get_close_matches(option, groups[key], n=1)
                    raise DistillError(
                        f"{o.input_line}: config group {key!r} has no option {option!r}; "
                        + (f"did you mean {close[0]!r}? " if close else "")
                        + f"options: {', '.join(groups[key])}"
                        + (f" (a model directory is {key}.path={option})" if "/" in option and f"{key}.path" in keys
                           else "")
                    )
        elif not o.is_delete() and (problem := _unknown_key(o, keys, groups)):  # key=, +key=, ++key=
            raise DistillError(problem)
        if not (args.multirun and o.is_sweep_override()):
            composed.append(o.input_line)
        elif values:
            composed.append(f"{o.get_key_element()}={next(o.sweep_string_iterator())}")
    try:
        with initialize_config_module("distill.recipes", version_base=None):
            compose("config", overrides=composed)
    except Exception as e:  # noqa: BLE001 - OmegaConf also raises AssertionError, AttributeError
        raise DistillError(_composition_error(e, overrides, keys, groups)) from None
    return args, overrides


def _hydra_writes_nothing(parsed: tuple[argparse.Namespace, list[Override]] | None) -> list[str]:
    """Overrides that keep Hydra from writing into the working directory when the run's directory
    is given (``output_dir=`` or ``resume=``, one run): Hydra would otherwise make its time-stamped
    ``outputs/DATE/TIME/`` and leave it holding only ``.hydra/``. A ``hydra.run.*`` or
    ``hydra.output_subdir`` of the user's, or a sweep (``-m``), is left as it is. ``parsed``: the
    command line as ``_check_overrides`` returns it."""
    if parsed is None:
        return []
    args, overrides = parsed
    keys = {o.key_or_group for o in overrides}
    if args.multirun or not keys & {"output_dir", "resume"} or any(
            k.startswith("hydra.run") or k == "hydra.output_subdir" for k in keys):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null"]


# Hydra's own time-stamped output directories (hydra.run.dir / hydra.sweep.dir + subdir by default),
# relative to the working directory: the only ones of Hydra's a failed run may remove.
HYDRA_DEFAULT_DIR = re.compile(r"(outputs|multirun)/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}(/\d+)?")


def _holds_only_hydra_files(d: Path) -> bool:
    """Whether the directory ``d`` holds nothing but Hydra's files (``.hydra/``, ``*.log``), or nothing."""
    return all((e.name == ".hydra" and e.is_dir()) or (e.suffix == ".log" and e.is_file()) for e in d.iterdir())


def _new_outputs(hydra_dir: Path, run_dir: Path | None = None) -> list[Path]:
    """The directories a failed run may remove, judged before it writes anything: the run directory
    and its parents where they do not exist yet; or (without ``run_dir``) Hydra's output directory
    where it is Hydra's default, time-stamped one holding only Hydra's files (Hydra made it just
    before distill began), with its parents below the working directory (removed only if empty)."""
    if run_dir is not None:
        return [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    cwd = Path.cwd()
    if cwd not in hydra_dir.parents or not HYDRA_DEFAULT_DIR.fullmatch(hydra_dir.relative_to(cwd).as_posix()):
        return []
    if not _holds_only_hydra_files(hydra_dir):
        return []
    return [hydra_dir, *(p for p in hydra_dir.parents if cwd in p.parents)]


def _remove_failed_outputs(new: list[Path], run_dir: Path | None, hydra_dir: Path) -> None:
    """After a failed run, remove the directories of ``new`` (see ``_new_outputs``), deepest first, where
    they hold nothing of value: the run directory unless it holds a checkpoint, Hydra's directory if it
    holds only Hydra's files, any other directory only when empty."""
    from distill.checkpoint import CHECKPOINT_PREFIX

    for d in sorted(set(new), key=lambda p: len(p.parts), reverse=True):
        if not d.is_dir():
            continue
        if (d == run_dir and not any(d.glob(f"checkpoints/{CHECKPOINT_PREFIX}*/"))) or (
                d == hydra_dir and _holds_only_hydra_files(d)):
            shutil.rmtree(d, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty


def _override_keys(hydra_cfg) -> list[str]:
    """The keys of the command line's overrides, in order (``+``/``~`` prefixes dropped)."""
    return [o.split("=")[0].lstrip("+~") for o in hydra_cfg.overrides.task]


@hydra.main(version_base=None, config_path="pkg://distill.recipes", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    from distill.train import train

    console = make_console()
    hydra_cfg = HydraConfig.get()
    hydra_dir = Path(hydra_cfg.runtime.output_dir)
    cfg, run_dir, new = None, None, _new_outputs(hydra_dir)
    try:
        cfg = OmegaConf.to_object(raw)
        if cfg.resume is not None:
            fixed = [o for o, k in zip(hydra_cfg.overrides.task, _override_keys(hydra_cfg), strict=True)
                     if k not in RESUME_OVERRIDABLE]
            if fixed:
                raise DistillError(
                    f"resume continues the run's saved config ({cfg.resume}/config.yaml); drop {' '.join(fixed)} "
                    f"(only {', '.join(RESUME_OVERRIDABLE[1:])} may change)"
                )
        run_dir = Path(os.path.abspath(cfg.output_dir or hydra_dir))
        new += _new_outputs(hydra_dir, run_dir)
        steps = cfg.trainer.steps if cfg.resume is not None and "trainer.steps" in _override_keys(hydra_cfg) else None
        result = train(cfg, run_dir, steps=steps)
    except (DistillError, OmegaConfBaseException) as e:
        resumed = cfg is not None and cfg.resume is not None  # the run directory is the resumed run's: kept
        _remove_failed_outputs(new, None if resumed else run_dir, hydra_dir)
        _fail(e)
    if int(os.environ.get("RANK", "0")) != 0:  # several ranks: one reports
        return
    split = "test" if result.test else "validation"  # user data without a test split: the validation's
    if getattr(result, split):
        console.print(summary_table(getattr(result, split), split))
    console.print(f"model: {result.model_dir}\nrun:   {result.run_dir}")
    if result.draft:
        taus = ", ".join(f"{r['tau_measured']:.2f} at gamma {r['gamma']}" for r in result.draft["by_gamma"])
        console.print(f"draft: {result.run_dir / 'draft'} (alpha {result.draft['alpha']:.3f}; tau {taus})")


@dataclass
class ExportDraftConfig:
    """``distill export-draft`` options."""

    student: str = MISSING
    target: str = MISSING
    out: str = MISSING
    num_assistant_tokens: int = 5


def _typed_options(schema: type, args: list[str]) -> object:
    """``key=value`` arguments as an instance of the dataclass ``schema``; a list option also takes
    ``1,2`` and a single ``4`` for ``[1,2]`` and ``[4]``."""
    lists = {k for k, t in typing.get_type_hints(schema).items() if typing.get_origin(t) is list}
    args = [f"{k}=[{v}]" if k in lists and sep and not v.lstrip().startswith("[") else a
            for a in args for k, sep, v in [a.partition("=")]]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(args)))


def _subcommand(name: str, args: list[str]) -> None:
    """``eval-draft`` and ``export-draft``: typed configs from ``key=value`` arguments."""
    from distill.draft_eval import DraftEvalConfig, evaluate_draft
    from distill.export import export_draft

    schema = DraftEvalConfig if name == "eval-draft" else ExportDraftConfig
    console = make_console()
    try:
        cfg = _typed_options(schema, args)
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
        _fail(f"{name}: {e}")


def _bench(args: list[str]) -> typing.NoReturn:
    """``distill bench SUITE ...``: the benchmark suite of the source checkout this distill runs from."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        _fail("distill bench runs the benchmark suite of a source checkout (benchmarks/ is not installed with the "
              "package): clone the repository, pip install -e '.[bench]' and run distill bench there")
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *args])


def _composed(args: list[str]) -> DistillConfig:
    """The config of a subcommand that takes a run's overrides (recipes included), checked."""
    _check_overrides(args)
    with initialize_config_module("distill.recipes", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=args))


def _plan(args: list[str]) -> typing.NoReturn:
    """``distill plan [overrides]``: the run's plan, without loading any weights; exit 1 if it does not fit."""
    from distill.config import validate
    from distill.plan import advice, make_plan, render

    try:
        cfg = _composed(args)
        validate(cfg)
        plan = make_plan(cfg)
    except (DistillError, OmegaConfBaseException) as e:
        _fail(f"plan: {e}")
    print(render(plan))
    if not plan.fits:
        print(f"to fit, try {advice(cfg, plan)}")
    sys.exit(0 if plan.fits else 1)


def _cache_teacher(args: list[str]) -> typing.NoReturn:
    """``distill cache-teacher teacher.cache=DIR [overrides]``: the teacher's view of the run's data
    on disk (``distill.offline``)."""
    from distill.offline.build import cache_teacher

    console = make_console()
    try:
        cfg = _composed(args)
        done = cache_teacher(cfg, progress=cfg.trainer.progress)
    except (DistillError, OmegaConfBaseException) as e:
        _fail(f"cache-teacher: {e}")
    console.print(f"teacher cache {done.directory}: {done.rows:,} sequences, {done.entries:,} response tokens in "
                  f"{done.shards} shards ({done.written} written now); {done.bytes / 2**20:,.1f} MiB, "
                  f"{done.bytes_per_token:,.0f} bytes per token", markup=False)
    sys.exit(0)


def _serve_teacher(args: list[str]) -> typing.NoReturn:
    """``distill serve-teacher teacher.remote=NAME [overrides]``: the teacher's workers on Ray, until
    Ctrl-C or SIGTERM (``distill.remote``)."""
    from distill.plan import worker_plan
    from distill.remote.serve import serve_teacher

    console = make_console()
    try:
        cfg = _composed(args)
        plan = worker_plan(cfg) if cfg.teacher.path else None
        if plan is not None:
            console.print(f"plan per worker:\n{plan.render()}", markup=False)
            if not plan.fits and cfg.plan.check:
                raise DistillError(f"a worker needs about {fmt(plan.peak)}, {fmt(plan.available)} available; lower "
                                   "trainer.batch_size or teacher.remote_workers (plan.check=false serves anyway)")
        serve_teacher(cfg, say=lambda line: console.print(line, markup=False))
    except (DistillError, OmegaConfBaseException) as e:
        _fail(f"serve-teacher: {e}")
    sys.exit(0)


def _async_spelled(arg: str) -> str:
    """``sources.async.KEY=...`` as the config spells it: ``async`` is a keyword of Python, so the
    group's field is ``sources.asynchronous``."""
    return re.sub(r"^([+~]*)sources\.async\.", r"\1sources.asynchronous.", arg)


def main() -> None:
    """Console-script entry point."""
    # FutureWarnings tell the authors of the calling code (DeepSpeed's collectives, PEFT's checks)
    # about deprecations: nothing a user of distill can act on. The test suite still shows them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The deepspeed launcher passes --local_rank=N (also in LOCAL_RANK, which distill reads).
    sys.argv = [_async_spelled(a) for a in sys.argv if not a.startswith("--local_rank")]
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        _bench(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        _plan(sys.argv[2:])
    subcommand = len(sys.argv) > 1 and sys.argv[1] in ("eval-draft", "export-draft")
    cache = len(sys.argv) > 1 and sys.argv[1] == "cache-teacher"
    serve = len(sys.argv) > 1 and sys.argv[1] == "serve-teacher"
    if not subcommand and not cache and not serve:
        try:
            parsed = _check_overrides(sys.argv[1:])
        except DistillError as e:
            _fail(e)
        sys.argv += _hydra_writes_nothing(parsed)
    import torch
    import transformers

    if not torch.cuda.is_available():  # DeepSpeed (imported by save_pretrained) would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # distill draws its own progress; transformers' per-file loading bars would only clutter it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if subcommand:
        _subcommand(sys.argv[1], sys.argv[2:])
        return
    if cache:
        _cache_teacher(sys.argv[2:])
    if serve:
        _serve_teacher(sys.argv[2:])
    _hydra_main()


if __name__ == "__main__":
    main()
