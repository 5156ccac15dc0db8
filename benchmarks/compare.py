"""The regression gate: a suite run against the committed baseline.

A gated metric fails when it is worse than its baseline value by more than its tolerance (lower
for ``higher`` metrics, higher for ``lower`` ones); a metric the baseline has and the run lacks
fails too. Every metric is printed with baseline, current, tolerance and verdict.

A baseline (``benchmarks/baseline/SUITE.json``) is made from several runs of the suite with
different seeds (``python -m benchmarks baseline``): the value is the median over the runs and the
tolerance ``SPREAD_FACTOR`` times their range (max - min), never below the metric's floor (its
resolution, as the measuring code states it in the baseline's runs and in the run compared: a
few test examples of 200, float32 rounding, 2% of a same-run ratio). The range of the
runs is run-to-run spread measured on this machine: for quality metrics it is the spread over
seeds (each seed's run is itself deterministic here), for ratios also the timing noise.
"""

from __future__ import annotations

import statistics

from benchmarks.environment import environment

SPREAD_FACTOR = 2.0


def make_baseline(runs: list[dict], pooled: dict[str, list[float]] | None = None) -> dict:
    """A baseline from several ``suite.json`` records of the same suite (different seeds).
    ``pooled``: earlier runs of some metrics on another machine type, by name; a metric's tolerance
    then covers the range of its runs on both (its value stays this machine's median)."""
    suite = {r["suite"] for r in runs}
    if len(suite) != 1:
        raise SystemExit(f"baseline: the runs are of different suites: {sorted(suite)}")
    names = [n for n in runs[0]["metrics"] if all(n in r["metrics"] for r in runs)]
    metrics = {}
    for name in names:
        values = [r["metrics"][name]["value"] for r in runs]
        first = runs[0]["metrics"][name]
        median = statistics.median(values)
        both = values + (pooled or {}).get(name, [])
        spread = max(both) - min(both)
        floor = statistics.median(r["metrics"][name]["floor"] for r in runs)
        metrics[name] = {"value": median, "better": first["better"], "kind": first["kind"],
                         "tolerance": max(floor, SPREAD_FACTOR * spread), "runs": values, "floor": floor}
        if name in (pooled or {}):
            metrics[name]["pooled_runs"] = pooled[name]
    return {"suite": runs[0]["suite"], "seeds": [r["seed"] for r in runs], "environment": environment(),
            "spread_factor": SPREAD_FACTOR, "metrics": metrics}


def verdicts(baseline: dict, current: dict) -> list[dict]:
    """One row per metric of either: name, baseline, current, tolerance, verdict (``ok``,
    ``better``, ``WORSE``, ``MISSING`` or ``new``)."""
    rows = []
    base, cur = baseline["metrics"], current["metrics"]
    for name in dict.fromkeys([*base, *cur]):
        b, c = base.get(name), cur.get(name)
        if b is None:
            rows.append({"metric": name, "baseline": None, "current": c["value"], "tolerance": None, "verdict": "new"})
            continue
        if c is None:
            rows.append({"metric": name, "baseline": b["value"], "current": None, "tolerance": b["tolerance"],
                         "verdict": "MISSING"})
            continue
        # The floor is the metric's resolution as the measuring code states it now.
        tolerance = max(b["tolerance"], c.get("floor", 0.0))
        change = (c["value"] - b["value"]) * (1 if b["better"] == "higher" else -1)  # > 0: an improvement
        verdict = "WORSE" if change < -tolerance else "better" if change > tolerance else "ok"
        rows.append({"metric": name, "baseline": b["value"], "current": c["value"], "tolerance": tolerance,
                     "better": b["better"], "verdict": verdict})
    return rows


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["verdict"] in ("WORSE", "MISSING")]


def table(rows: list[dict]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.4g}"

    lines = ["| metric | better | baseline | current | tolerance | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r.get('better', '-')} | {f(r['baseline'])} | {f(r['current'])} "
              f"| {f(r['tolerance'])} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)
