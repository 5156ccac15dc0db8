"""Two CPU ranks on DeepSpeed (gloo), launched as a user launches them, against one process.

The built-in tasks with the shipped teacher and student, four steps of two micro-batches each:
step 1 from the dataset, step 2 on-policy (student samples), steps 3-4 SKD. Sampling is greedy
(SKD with k=1 and a greedy teacher), so that one process and two ranks see the same sequences;
what is compared is then the sharded arithmetic: ZeRO-3 partitions, token counts all-reduced
across ranks, accumulation over micro-batches and length groups, gathered generation.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Every test here launches several ranks (deepspeed or torchrun): make test-fast skips them.
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STEPS = [
    "trainer.steps=4", "trainer.batch_size=8", "trainer.grad_accum=2", "trainer.log_every=1", "trainer.save_every=2",
    "trainer.keep_checkpoints=3", "trainer.eval_every=100", "trainer.progress=false", "final_eval=false",
    "data.num_validation=20", "sources.teacher_cache=none", "eval.samples=2", "trainer.eval_batch_size=8",
    # step 0: the dataset; step 1: on-policy; steps 2-3: SKD (weight 1000 against the student's 1)
    "sources.weights.dataset.end=0", "sources.weights.dataset.kind=step", "sources.weights.dataset.steps=1",
    "sources.weights.student.end=1", "sources.weights.student.kind=step", "sources.weights.student.steps=1",
    "sources.weights.skd.end=1000", "sources.weights.skd.kind=step", "sources.weights.skd.steps=2",
    "sources.student.greedy=true", "sources.skd.k.start=1", "sources.skd.teacher_greedy=true",
]
# One process and two ranks sum the same terms in another order: float32 rounding.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run(ranks: int, *args: str, launcher: str = "deepspeed", timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m distill ARGS`` in one process, or on ``ranks`` CPU ranks by ``launcher``."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "distill", *args]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_free_port()), "--module",
               "distill", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(_free_port()), "-m",
               "distill", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return proc


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process; two ZeRO-3 ranks; the two-rank run resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("distributed")
    run(1, *STEPS, f"output_dir={root / 'one'}")
    launched = run(2, *STEPS, "deepspeed=zero3", f"output_dir={root / 'zero3'}")
    (root / "zero3.out").write_text(launched.stdout + launched.stderr)
    shutil.copytree(root / "zero3", root / "resumed")
    for gone in ("checkpoints/step-0000004", "model", "report.json"):  # as if killed after step 3
        shutil.rmtree(root / "resumed" / gone) if (root / "resumed" / gone).is_dir() else (
            root / "resumed" / gone).unlink()
    run(2, f"resume={root / 'resumed'}")
    return {name: root / name for name in ("one", "zero3", "resumed")}


def test_ranks_stay_in_step_through_uneven_generation_rounds():
    """A gathered generation round makes no collective calls, however many forwards each rank runs
    in it (tests/two_rank_generation.py)."""
    port = str(_free_port())
    script = str(Path(__file__).with_name("two_rank_generation.py"))
    procs = [subprocess.Popen([sys.executable, script, port, str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs) and outs[0][0].strip().endswith("in step"), [
        (p.returncode, err[-1500:]) for p, (_, err) in zip(procs, outs, strict=True)]  # both ranks: which failed



def test_a_rank_that_cannot_write_its_checkpoint_stops_every_rank_at_once(tmp_path):
    """The success flag is gathered before rank 0 renames the directory (tests/two_rank_checkpoint.py)."""
    port = str(_free_port())
    script = str(Path(__file__).with_name("two_rank_checkpoint.py"))
    procs = [subprocess.Popen([sys.executable, script, port, str(rank), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]  # a rank left at a barrier would time out
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    assert outs[0][0].strip().endswith("clean")

def test_routed_teachers_sharded_by_zero3_keep_the_ranks_in_step(tmp_path):
    """Two teachers sharded by ZeRO-3, each example routed to one: a rank whose rows of a
    micro-batch all go to one teacher still runs the other's collective forward, and two ranks
    train as one process does."""
    assets = Path(__file__).parents[1] / "distill" / "assets"  # two models of other shapes: collectives differ
    routed = ["teacher=none", "student=tiny", f"+teachers={{a:{{path:{assets / 'teacher'},routes:[arithmetic]}},"
              f"b:{{path:{assets / 'student'},routes:[spelling]}}}}", "combine=route", "trainer.steps=4",
              "trainer.batch_size=4", "trainer.log_every=1", "trainer.eval_every=100", "trainer.save_every=100",
              "trainer.progress=false", "final_eval=false", "data.num_train=32", "data.num_validation=4"]
    shared = lambda: set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))  # noqa: E731
    before = shared()
    run(1, *routed, f"output_dir={tmp_path / 'one'}")
    run(2, *routed, "deepspeed=zero3", f"output_dir={tmp_path / 'two'}", timeout=300)  # out of step: gloo fails
    assert shared() <= before  # DeepSpeed's CPU all-reduce buffers (66 MB a rank) are not left behind
    one, two = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "divergence_a", "divergence_b"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key)


def test_two_zero3_ranks_train_as_one_process(runs):
    one, two = train_rows(runs["one"]), train_rows(runs["zero3"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    drawn = [next(k for k, v in r.items() if k.startswith("source_") and v == 1.0) for r in two]
    assert drawn == ["source_dataset", "source_student", "source_skd", "source_skd"]
    for a, b in zip(one, two, strict=True):
        # The gradient norm sees a count or scale that is off by the world size, which the loss
        # does not (and AdamW's first steps barely do).
        for key in ("loss", "grad_norm", "response_tokens"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a["step"], key, a[key], b[key])
    wa, wb = weights(runs["one"]), weights(runs["zero3"])
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=WEIGHT_ATOL), (k, (wa[k] - wb[k]).abs().max())


def test_two_ranks_split_the_evaluation_and_report_one_processs_numbers(runs):
    """Validation (losses, greedy accuracy, sampled mean@2 / pass@2 / distinct@2) with the records
    split across two ZeRO-3 ranks, in step: the numbers of one process. Breaks caught: a rank's
    share dropped from the gather, the sampled seed taken from the rank's own batch count."""
    def validation(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "validation"][-1]

    one, two = validation(runs["one"]), validation(runs["zero3"])
    assert one.keys() == two.keys() and {"mean@2", "pass@2", "distinct@2", "accuracy"} <= one.keys()
    for key in one:
        if isinstance(one[key], float):
            assert two[key] == pytest.approx(one[key], rel=LOSS_RTOL), key


def test_a_launch_prints_nothing_the_user_cannot_act_on(runs):
    """Two ranks on DeepSpeed: no deprecation notices meant for DeepSpeed's and PEFT's authors, no
    libraries' INFO lines in Hydra's format (DeepSpeed's compiler commands), no op-build notice."""
    out = (runs["zero3"].parent / "zero3.out").read_text()
    assert "plan: about" in out and "model: " in out  # distill's own lines are there
    for noise in ("FutureWarning", "[HYDRA]", "built successfully"):
        assert noise not in out, noise


def test_each_rank_holds_half_of_each_model(runs):
    sharding = json.loads((runs["zero3"] / "report.json").read_text())["sharding"]
    assert sharding["world_size"] == 2 and sharding["stage"] == 3 and len(sharding["ranks"]) == 2
    for rank in sharding["ranks"]:
        for model in ("student", "teacher"):
            share = rank[model] / sharding[f"{model}_parameters"]
            assert 0.49 <= share <= 0.51, (model, share)
    assert "## sharding" in (runs["zero3"] / "report.md").read_text()


def test_resumed_two_rank_run_continues_identically(runs):
    full, resumed = train_rows(runs["zero3"]), train_rows(runs["resumed"])
    assert full == [r | {k: full[i][k] for k in r if k.endswith(("_per_s", "seconds"))} for i, r in enumerate(resumed)]
    wa, wb = weights(runs["zero3"]), weights(runs["resumed"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = runs["zero3"] / "checkpoints" / "step-0000004"
    assert (ckpt / "deepspeed").is_dir() and {f"rng-{r}.pt" for r in (0, 1)} <= {p.name for p in ckpt.iterdir()}


SAMPLED = [  # sampling at temperature 1: dataset, on-policy, SeqKD (the teacher's samples, cached), SKD (top 5)
    *[s for s in STEPS if not s.startswith(("sources.student.greedy", "sources.skd", "sources.teacher_cache"))],
    "sources.weights.teacher.end=1000", "sources.weights.teacher.kind=step", "sources.weights.teacher.steps=2",
    "sources.weights.skd.end=1000000", "sources.weights.skd.kind=step", "sources.weights.skd.steps=3",
    "sources.skd.k.start=5"]
SAMPLED_SOURCES = ["source_dataset", "source_student", "source_teacher", "source_skd"]


def test_zero_stages_agree_with_sampled_sources(tmp_path):
    """A LoRA student on two ranks at ZeRO-1, ZeRO-2 and ZeRO-3 with offloaded optimizer state and
    weights, with sampled on-policy, SeqKD and SKD steps: each rank samples its share with its own
    seed whatever the stage, so the runs see the same sequences and train alike (the later runs
    take the teacher's responses from the cache the first wrote, merged from both ranks); and
    every rank kept in step through sampling of different lengths."""
    lora = ["student.lora.enabled=true", "student.lora.r=4", "loss.ce_weight=0.5"]
    stages = ("zero1", "zero2", "zero3_offload")
    for stage in stages:
        run(2, *SAMPLED, *lora, f"deepspeed={stage}", f"output_dir={tmp_path / stage}")
    a = train_rows(tmp_path / stages[0])
    assert [next(k for k, v in r.items() if k.startswith("source_") and v == 1.0) for r in a] == SAMPLED_SOURCES
    wa = weights(tmp_path / stages[0])
    for stage in stages[1:]:
        b = train_rows(tmp_path / stage)
        assert [r["response_length"] for r in a[1:]] == [r["response_length"] for r in b[1:]]
        for x, y in zip(a, b, strict=True):
            for key in ("loss", "grad_norm"):
                assert y[key] == pytest.approx(x[key], rel=LOSS_RTOL), (stage, x["step"], key)
        wb = weights(tmp_path / stage)
        assert all(torch.allclose(wa[k], wb[k], atol=WEIGHT_ATOL) for k in wa), stage


def test_lora_student_under_zero3_with_its_base_as_teacher(tmp_path):
    """LoRA adapters trained under ZeRO-3 (torchrun, two ranks) against the student's own base model
    (adapters disabled: one copy of the weights), half SFT so that the adapters move; resumed
    exactly (LoRA dropout draws from each rank's random state); exported merged as a plain model
    that AutoModelForCausalLM loads and export-draft takes."""
    from transformers import AutoModelForCausalLM

    from distill.config import ASSETS

    base = ASSETS / "student"
    lora = [*SAMPLED, "deepspeed=zero3", "student.lora.enabled=true", "student.lora.dropout=0.1",
            f"teacher.path={base}", "teacher.student_base=true", "loss.ce_weight=0.5"]
    run(2, *lora, f"output_dir={tmp_path / 'lora'}", launcher="torchrun")
    shutil.copytree(tmp_path / "lora", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "resumed" / "model")
    (tmp_path / "resumed" / "report.json").unlink()
    run(2, f"resume={tmp_path / 'resumed'}", launcher="torchrun")
    merged, again = weights(tmp_path / "lora"), weights(tmp_path / "resumed")
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    assert train_rows(tmp_path / "lora")[-1]["loss"] == train_rows(tmp_path / "resumed")[-1]["loss"]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in model.state_dict())
    base_model = AutoModelForCausalLM.from_pretrained(base)
    before = base_model.state_dict()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved), moved  # the adapted layers, merged
    report = json.loads((tmp_path / "lora" / "report.json").read_text())
    # One copy of the weights: the teacher is the student's base (its parameters, not the adapters').
    assert report["sharding"]["teacher_parameters"] == sum(p.numel() for p in base_model.parameters())
    proc = subprocess.run([sys.executable, "-m", "distill", "export-draft", f"student={tmp_path / 'lora' / 'model'}",
                           f"target={ASSETS / 'teacher'}", f"out={tmp_path / 'draft'}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "draft").config.vocab_size >= model.config.vocab_size
