"""``python -m benchmarks``: run a suite, gate it against its baseline, or make a new baseline.

    python -m benchmarks ci|full|gpu [--out DIR] [--seed N] [--only MEMBER,...] [MEMBER.OPTION=VALUE ...]
    python -m benchmarks compare [--baseline benchmarks/baseline/ci.json] [--current DIR/suite.json]
    python -m benchmarks baseline [--suite ci] [--runs 3]

Results go to ``benchmarks/results/SUITE/`` unless ``--out`` says otherwise. ``MEMBER.OPTION=VALUE``
overrides a member's option for this run (VALUE is YAML), e.g. an ablation of the recipe study:
``python -m benchmarks full --only recipes recipes.name=gkd_ablation
recipes.variants='["fkl=gkd,loss.kind=fkl"]' recipes.seeds=[0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from benchmarks.suite import MEMBERS, ROOT, SUITES, run_suite


def _options(pairs: list[str]) -> dict[str, dict]:
    options: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        member, dot, option = key.partition(".")
        if not sep or not dot or member not in MEMBERS:
            raise SystemExit(f"{pair!r}: expected MEMBER.OPTION=VALUE with MEMBER one of {', '.join(MEMBERS)}")
        options.setdefault(member, {})[option] = yaml.safe_load(value)
    return options


def compare_main(argv: list[str]) -> int:
    from benchmarks.compare import failed, table, verdicts

    ap = argparse.ArgumentParser(prog="python -m benchmarks compare",
                                 description="Gate a suite run against its committed baseline.")
    ap.add_argument("--baseline", type=Path, default=ROOT / "baseline" / "ci.json")
    ap.add_argument("--current", type=Path, default=ROOT / "results" / "ci" / "suite.json")
    args = ap.parse_args(argv)
    for path in (args.baseline, args.current):
        if not path.is_file():
            raise SystemExit(f"compare: no such file: {path}")
    baseline, current = json.loads(args.baseline.read_text()), json.loads(args.current.read_text())
    if baseline["suite"] != current["suite"]:
        raise SystemExit(f"compare: {args.baseline} is of suite {baseline['suite']}, {args.current} of "
                         f"{current['suite']}")
    rows = verdicts(baseline, current)
    report = table(rows)
    (args.current.parent / "compare.md").write_text(report + "\n")
    print(report)
    bad = failed(rows)
    print(f"\ngate: {len(bad)} of {len(rows)} metrics fail" if bad else f"\ngate: passed ({len(rows)} metrics)")
    return 1 if bad else 0


def baseline_main(argv: list[str]) -> int:
    from benchmarks.compare import make_baseline
    from benchmarks.metrics import write_json

    ap = argparse.ArgumentParser(prog="python -m benchmarks baseline",
                                 description="Run a suite with seeds 0 .. runs-1 and make its baseline from them.")
    ap.add_argument("--suite", default="ci", choices=list(SUITES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pool", type=Path, action="append", default=[], metavar="FILE",
                    help="earlier runs (baseline/ci-other-machines.json: another machine type; "
                         "baseline/ci-history.json: CI's own runs): their range widens the tolerance of the metrics "
                         "they name; may be repeated")
    ap.add_argument("--reuse", action="store_true",
                    help="make the baseline from the runs already in results/SUITE-spread/ instead of running them")
    args = ap.parse_args(argv)
    if args.runs < 2:
        raise SystemExit("baseline: --runs must be >= 2 (the tolerance is the spread of the runs)")
    spread = ROOT / "results" / f"{args.suite}-spread"
    runs = [json.loads((spread / f"seed{s}" / "suite.json").read_text()) if args.reuse else
            run_suite(args.suite, spread / f"seed{s}", seed=s) for s in range(args.runs)]
    pooled: dict[str, list[float]] = {}
    for path in args.pool:
        for name, values in json.loads(path.read_text())["runs"].items():
            pooled.setdefault(name, []).extend(values)
    path = ROOT / "baseline" / f"{args.suite}.json"
    write_json(path, make_baseline(runs, pooled or None))
    print(f"baseline written to {path}: commit it with the reason in the commit message")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "baseline":
        return baseline_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=list(SUITES))
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/SUITE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=lambda v: v.split(","), default=None, metavar="MEMBER[,MEMBER...]")
    ap.add_argument("options", nargs="*", help="MEMBER.OPTION=VALUE")
    args = ap.parse_intermixed_args(argv)
    out = args.out or ROOT / "results" / args.suite
    run_suite(args.suite, out, seed=args.seed, only=args.only, options=_options(args.options))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    import torch
    import transformers

    if not torch.cuda.is_available():  # DeepSpeed (imported by save_pretrained) would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    transformers.utils.logging.disable_progress_bar()
    sys.exit(main())
