"""The benchmark suite's plumbing and its regression gate, with regressions planted on purpose.

The planted tests run the cheap members' measurements at the ``ci`` suite's options and compare
them with the committed baseline (``benchmarks/baseline/ci.json``) exactly as ``.ci/run`` does:
the real tree passes, a wrong divergence, a sampler that ignores its temperature and a slower
loss path fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill.fused_loss
import distill.generation
import distill.losses
from benchmarks import fused_loss, sampling
from benchmarks.compare import failed, make_baseline, verdicts
from benchmarks.environment import environment
from benchmarks.metrics import metric
from benchmarks.suite import SUITES, run_suite
from benchmarks.trl_gkd import distill_config, trl_fields

ROOT = Path(__file__).parents[1]
BASELINE = json.loads((ROOT / "benchmarks" / "baseline" / "ci.json").read_text())


def test_every_result_names_its_packages_device_and_commit():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["transformers"]
    assert env["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and env["cpu"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if head:  # a checkout (CI's is one); the commit is HEAD, marked dirty when tracked files changed
        assert env["git_commit"].removesuffix("-dirty") == head


def test_every_committed_result_json_carries_its_environment():
    """Each JSON result under benchmarks/results/ (and the baseline) holds an environment record."""
    found = sorted((ROOT / "benchmarks" / "results").rglob("*.json")) + [ROOT / "benchmarks" / "baseline" / "ci.json"]
    assert len(found) > 10
    lacking = [str(p.relative_to(ROOT)) for p in found if "environment" not in json.loads(p.read_text())]
    assert not lacking, lacking


def test_the_loop_profile_wraps_what_the_loop_calls(teacher_dir, student_dir, tmp_path):
    """trl_gkd's profile of distill's loop wraps the functions the loop really calls: a GKD run
    (on-policy and dataset steps) books time to generation, both forwards, the loss and the step."""
    from test_train import make_cfg

    from benchmarks.trl_gkd import Phases
    from distill.config import Schedule, source_weights
    from distill.train import train

    phases, real_backward = Phases(), torch.Tensor.backward
    try:
        phases.install()
        cfg = make_cfg(teacher_dir, student_dir, steps=4, eval_every=100)
        cfg.final_eval, cfg.data.num_validation = False, 0
        cfg.sources.weights = source_weights(dataset=Schedule(0.5), student=Schedule(0.5))
        train(cfg, tmp_path / "run")
    finally:
        phases.uninstall()
    for phase in ("generation", "student forward", "teacher forward", "loss (LM heads + divergence)", "backward",
                  "optimizer step"):
        assert phases.seconds.get(phase, 0.0) > 0, (phase, phases.seconds)
    assert torch.Tensor.backward is real_backward  # uninstall put it back


def _record(metrics: dict, seed: int = 0) -> dict:
    return {"suite": "ci", "seed": seed, "metrics": metrics}


def test_baseline_takes_the_median_and_twice_the_spread_never_below_the_floor():
    runs = [_record({"acc": metric(v, "higher", "quality", floor=0.01), "r": metric(w, "lower", "ratio")}, s)
            for s, (v, w) in enumerate([(0.90, 1.000), (0.86, 1.004), (0.88, 1.008)])]
    base = make_baseline(runs)["metrics"]
    assert base["acc"]["value"] == pytest.approx(0.88) and base["acc"]["tolerance"] == pytest.approx(0.08)
    # The ratios spread by 0.008 (twice that: 0.016), under their floor of 2% of the value: the floor holds.
    assert base["r"]["value"] == pytest.approx(1.004) and base["r"]["tolerance"] == pytest.approx(0.02 * 1.004)


def test_runs_of_another_machine_widen_the_tolerance_not_the_value():
    """Pooled runs (another CPU type) count in the range, not in the median; unnamed metrics keep theirs."""
    runs = [_record({"r": metric(w, "lower", "ratio"), "q": metric(0.5, "higher", "quality", floor=0.01)}, s)
            for s, w in enumerate([1.0, 1.1, 1.2])]
    base = make_baseline(runs, pooled={"r": [1.5, 1.4, 1.6]})["metrics"]
    assert base["r"]["value"] == pytest.approx(1.1) and base["r"]["tolerance"] == pytest.approx(2 * 0.6)
    assert base["r"]["pooled_runs"] == [1.5, 1.4, 1.6] and "pooled_runs" not in base["q"]
    assert make_baseline(runs)["metrics"]["r"]["tolerance"] == pytest.approx(2 * 0.2)


def test_gate_fails_a_metric_worse_than_its_tolerance_in_its_own_direction():
    baseline = {"metrics": {
        "acc": {"value": 0.9, "better": "higher", "kind": "quality", "tolerance": 0.02},
        "time": {"value": 1.0, "better": "lower", "kind": "ratio", "tolerance": 0.1},
        "gone": {"value": 1.0, "better": "lower", "kind": "ratio", "tolerance": 0.1},
    }}

    def verdict(acc: float, time: float) -> dict[str, str]:
        current = {"metrics": {"acc": metric(acc, "higher", "quality"), "time": metric(time, "lower", "ratio"),
                               "extra": metric(1.0, "lower", "ratio")}}
        return {r["metric"]: r["verdict"] for r in verdicts(baseline, current)}

    assert verdict(0.89, 1.05) == {"acc": "ok", "time": "ok", "gone": "MISSING", "extra": "new"}
    assert verdict(0.87, 1.0)["acc"] == "WORSE" and verdict(0.93, 1.0)["acc"] == "better"
    # The measuring code's floor (its resolution now) widens a baseline's narrower tolerance.
    floored = verdicts(baseline, {"metrics": {"acc": metric(0.87, "higher", "quality", floor=0.05)}})
    assert floored[0]["verdict"] == "ok" and floored[0]["tolerance"] == 0.05
    assert verdict(0.9, 1.11)["time"] == "WORSE" and verdict(0.9, 0.85)["time"] == "better"
    rows = verdicts(baseline, {"metrics": {"acc": metric(0.9, "higher", "quality"),
                                           "time": metric(1.0, "lower", "ratio")}})
    assert [r["metric"] for r in failed(rows)] == ["gone"]


def _gate(member: str, metrics: dict) -> list[dict]:
    """The gate's verdicts on these ``metrics`` of ``member`` (the suite's other metrics left out)."""
    current = {"metrics": {f"{member}: {k}": v for k, v in metrics.items()}}
    rows = [r for r in verdicts(BASELINE, current) if r["metric"] in current["metrics"]]
    assert rows and all(r["verdict"] != "new" for r in rows), "the baseline lacks these metrics"
    return rows


def _fidelity_metrics() -> dict:
    from distill.config import ASSETS, DataConfig, ModelConfig
    from distill.data import builtin_records, prompt_ids
    from distill.models import load_model, load_tokenizer

    opts = SUITES["ci"]["sampling"]
    tok = load_tokenizer(ASSETS / "teacher")
    prompts = [prompt_ids(r, tok) for r in builtin_records(DataConfig(), "test", opts.get("prompts", 32))]
    model = load_model(ModelConfig(path=str(ASSETS / "student")), "student", torch.device("cpu")).eval()
    fid = sampling.fidelity(model, tok, prompts, opts.get("draws", 8192), seed=0)
    return {f"tv {name}": metric(v["tv"], "lower", "quality") for name, v in fid.items()}


@pytest.mark.slow
def test_gate_passes_the_sampler_and_fails_one_that_ignores_its_temperature(monkeypatch):
    assert not failed(_gate("sampling", _fidelity_metrics()))
    real = distill.generation.sample

    def at_temperature_one(model, prompts, cfg, **kw):
        return real(model, prompts, type(cfg)(**{**cfg.__dict__, "temperature": 1.0}), **kw)

    monkeypatch.setattr(distill.generation, "sample", at_temperature_one)
    bad = failed(_gate("sampling", _fidelity_metrics()))
    assert [r["metric"] for r in bad] == ["sampling: tv temperature 0.7, top-p 0.9",
                                          "sampling: tv temperature 1.5, top-k 20"]


def _error_metrics() -> dict:
    return {f"{k} error vs float64": metric(e, "lower", "quality") for k, e in fused_loss.accuracy(seed=0).items()}


def test_gate_passes_the_fused_loss_and_fails_a_wrong_divergence(monkeypatch):
    assert not failed(_gate("fused_loss", _error_metrics()))
    real = distill.fused_loss.fused_linear_divergence

    def forward_for_reverse(*args, kind="gjsd", **kw):  # rkl computed as fkl: a wrong divergence
        return real(*args, kind="fkl" if kind == "rkl" else kind, **kw)

    monkeypatch.setattr(distill.fused_loss, "fused_linear_divergence", forward_for_reverse)
    assert [r["metric"] for r in failed(_gate("fused_loss", _error_metrics()))] == [
        "fused_loss: rkl error vs float64"]


@pytest.mark.slow
def test_gate_fails_a_slower_loss_path(monkeypatch):
    opts = SUITES["ci"]["fused_loss"]
    real = distill.fused_loss.fused_linear_divergence

    def three_times(*args, **kw):  # the same result, three times the work
        for _ in range(2):
            real(*args, **kw).detach()
        return real(*args, **kw)

    monkeypatch.setattr(distill.fused_loss, "fused_linear_divergence", three_times)
    times = fused_loss.speed(0, opts["speed_tokens"], 256, 32000, opts["chunks"][0], opts["repeats"])
    rows = _gate("fused_loss", {"fused over eager time": metric(times["distill-torch"] / times["eager"], "lower",
                                                                "ratio")})
    assert [r["verdict"] for r in rows] == ["WORSE"]


def test_suite_rejects_unknown_members(tmp_path):
    with pytest.raises(SystemExit, match="ci has no member 'nope'"):
        run_suite("ci", tmp_path, only=["nope"])
    with pytest.raises(SystemExit, match="unknown suite"):
        run_suite("nightly", tmp_path)


def test_trl_gets_distills_recipe_field_by_field():
    gkd, rows = trl_fields(distill_config("gkd", 300, 1, Path("/tmp/x")))
    assert (gkd["lmbda"], gkd["beta"], gkd["temperature"], gkd["max_new_tokens"]) == (0.5, 0.5, 1.0, 48)
    assert (gkd["learning_rate"], gkd["max_steps"], gkd["warmup_steps"], gkd["seed"]) == (1e-3, 300, 30, 1)
    assert not gkd["bf16"] and not gkd["gradient_checkpointing"]
    assert ("trainer.batch_size", 32, "per_device_train_batch_size", 32) in rows
    sup, _ = trl_fields(distill_config("supervised_kd", 300, 0, Path("/tmp/x")))
    assert (sup["lmbda"], sup["beta"]) == (0.0, 0.0)  # forward KL on the dataset
    for recipe in ("skd", "seqkd"):
        with pytest.raises(ValueError, match="TRL's GKD has no such source"):
            trl_fields(distill_config(recipe, 300, 0, Path("/tmp/x")))


def test_trls_gkd_loss_is_distills_divergence_at_the_mapped_beta():
    """The mapping's premise: TRL's generalized JSD with beta 0, 1 and 0.5 is distill's fkl, rkl and gjsd."""
    trl_gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 40, generator=g, dtype=torch.float64), torch.randn(3, 5, 40, generator=g,
                                                                              dtype=torch.float64)
    labels = torch.ones(3, 5, dtype=torch.long)
    for kind, beta in (("fkl", 0.0), ("rkl", 1.0), ("gjsd", 0.5)):
        theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
        ours = distill.losses.divergence(s.reshape(15, 40), t.reshape(15, 40), kind=kind, beta=beta, backend="torch")
        assert float(theirs) == pytest.approx(float(ours), rel=1e-10), kind


@pytest.mark.slow
def test_distill_bench_runs_the_checkouts_suite():
    out = subprocess.run([sys.executable, "-m", "distill", "bench", "--help"], capture_output=True, text=True,
                         cwd="/")
    assert out.returncode == 0 and "ci,full,gpu" in out.stdout


def test_many_answers_sorts_sum_pairs_errors_by_kind():
    """Each planted response lands in its own kind; a right answer is one whose parts sum to the
    total, whatever the worked line says, and the distinct first parts count wrong samples too."""
    from benchmarks.many_answers import KINDS, error_kind, error_kinds
    from distill.data import Record

    planted = {
        "57 - 20 = 37. #### 20 + 37": "right",
        "57 - 20 = 36. #### 20 + 37": "right",  # the checker reads the final answer only
        "57 - 20 = 37.": "no answer",
        "57 - 20 = 37. #### 20 + 3x": "no answer",
        "57 - 58 = 1. #### 58 + 1": "first part out of range",
        "57 - 57 = 1. #### 57 + 1": "first part out of range",  # a part of the total, not all of it
        "57 - 20 = 36. #### 20 + 36": "subtraction wrong",
        "47 - 20 = 27. #### 20 + 27": "other",  # the total misread
        "57 - 20 = 37. #### 20 + 38": "other",  # a right subtraction copied wrong
    }
    assert {error_kind(text, 57) for text in planted} == set(KINDS)
    for text, kind in planted.items():
        assert error_kind(text, 57) == kind, text
    record = Record(prompt="p", completion="57 - 1 = 56. #### 1 + 56", source="planted", task="sum_pairs")
    shares = error_kinds([record], [list(planted)])
    assert shares["right"] == 2 / len(planted) and sum(shares[k] for k in KINDS) == pytest.approx(1.0)
    assert shares["distinct first parts"] == 3  # 20, 58 and 57, right or not; the no-answer samples have none


def test_the_pipeline_prediction_follows_the_recurrence():
    """benchmarks.asynchronous.pipelined: s = 0 is the synchronous sum; s = 1 overlaps step t + 1's
    generation with step t's training (worked by hand); a dataset step (G = 0) waits for nothing;
    generation slower than training bounds the wall clock by the generation alone."""
    from benchmarks.asynchronous import pipelined

    T, G = [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.5, 0.0]
    assert pipelined(T, G, 0) == sum(T) + sum(G) == 5.0
    # Step 0 waits 0.5 for its samples; step 2's are made during step 1 (sent when step 1 starts).
    assert pipelined(T, G, 1) == 4.5
    assert pipelined([1.0] * 4, [2.0] * 4, 1) == 9.0  # four generations of 2, then the last step
    assert pipelined([1.0] * 4, [2.0] * 4, 0) == 12.0
    assert pipelined([2.0] * 4, [1.0] * 4, 4) == 9.0  # the first generation, then training alone
