"""The reward term beside the divergence: leave-one-out advantages, the policy gradient against a
float64 REINFORCE reference, alpha = 0 as today's objective, the on-policy source's groups, the
user's reward function and its errors, a run that reports its rewards, and runs whose samples
move towards a reward and away from its reverse."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_train import make_cfg

import distill.train as train_mod
from distill.config import EvalConfig, RewardConfig, SamplingConfig, Schedule, validate
from distill.data import Record, collate
from distill.errors import DistillError
from distill.evaluation import generate_samples
from distill.fused_loss import fused_linear_loss
from distill.models import load_model, load_tokenizer
from distill.objective import batch_loss
from distill.rewards import Rewards, RewardTerm, group_advantages
from distill.sources import REGISTRY
from distill.sources.base import SourceContext
from distill.teacher import as_teacher


def test_each_samples_baseline_is_the_mean_of_the_others_in_its_group():
    """RLOO: r_i minus the mean of the other samples of its prompt, group by group. A baseline
    that includes the sample itself (the mean of the group) gives (G - 1) / G of these."""
    assert group_advantages([1.0, 0.0, 0.0, 1.0], 2) == [1.0, -1.0, -1.0, 1.0]
    got = group_advantages([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0], 4)
    assert got == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3, -1.0, -1.0, -1.0, 3.0])
    assert group_advantages([3.0, 3.0, 3.0], 3) == [0.0, 0.0, 0.0]  # all alike: nothing to learn
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0, 3.0], 2)


def _reinforce_reference(h, w, h_t, w_t, labels, rewards, group, alpha):
    """float64, on whole logits: forward KL summed over counted tokens, minus alpha times the
    REINFORCE surrogate sum_i A_i sum_t log p(y_it) with A_i = r_i - mean of its group's others;
    both divided by the counted tokens."""
    counted = labels != -100
    logp_s = torch.log_softmax(h @ w.T, -1)
    logp_t = torch.log_softmax(h_t @ w_t.T, -1)
    fkl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)[counted].sum()
    r = rewards.view(-1, group)
    advantage = (r - (r.sum(1, keepdim=True) - r) / (group - 1)).reshape(-1)
    token_logp = logp_s.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * counted
    surrogate = (advantage[:, None] * token_logp).sum()
    return (fkl - alpha * surrogate) / counted.sum()


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)])
def test_the_policy_gradient_matches_a_float64_reinforce_reference(backend, dtype, tol):
    """Two prompts with three samples each, uneven lengths: the fused loss with each position's CE
    weighted by alpha * A has the reference's value and gradients (student hidden states and head).
    Breaks caught: the sign of the term, the weight dropped from the gradient, the baseline
    including the sample itself, a token count other than the divergence's."""
    torch.manual_seed(0)
    B, T, H, V, group, alpha = 6, 5, 8, 11, 3, 0.7
    h = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = labels[3, :1] = labels[5, 3:] = -100
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], dtype=torch.float64)
    ref = _reinforce_reference(h, w, h_t, w_t, labels, rewards, group, alpha)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))

    pg = torch.tensor(group_advantages(rewards.tolist(), group), dtype=torch.float64) * alpha
    x, wx = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    terms = fused_linear_loss(x, wx, labels, teacher_hidden=h_t.to(dtype), teacher_weight=w_t.to(dtype), kind="fkl",
                              reduction="sum", backend=backend, chunk_size=7, measure_cross_entropy=True,
                              ce_row_weights=pg[:, None].expand(B, T).to(dtype))
    got = terms.loss / (labels != -100).sum()
    got_h, got_w = torch.autograd.grad(got, (x, wx))
    assert got.item() == pytest.approx(ref.item(), rel=tol, abs=tol)
    assert torch.allclose(got_h.double(), ref_h, rtol=tol * 10, atol=tol)
    assert torch.allclose(got_w.double(), ref_w, rtol=tol * 10, atol=tol)
    # The reported cross-entropy stays the plain one: the weights enter the objective alone.
    plain = F.cross_entropy((h @ w.T).detach().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    assert terms.cross_entropy.item() == pytest.approx(plain.item(), rel=tol)


@pytest.fixture(scope="module")
def models(teacher_dir, student_dir, tokenizer_dir):
    cfg = make_cfg(teacher_dir, student_dir)
    cpu = torch.device("cpu")
    return cfg, load_tokenizer(tokenizer_dir), load_model(cfg.student, "s", cpu), load_model(cfg.teacher, "t", cpu)


def test_alpha_zero_is_todays_objective(teacher_dir, student_dir, tmp_path):
    """reward.alpha=0 (with the rest of reward.* set) trains exactly as a run without a reward: the
    same prompts per step, metrics and weights, bit for bit. Break caught: a reward term built or
    groups sampled at alpha 0."""
    runs = {}
    for name, reward in (("plain", RewardConfig()), ("zero", RewardConfig(alpha=0.0, group=2))):
        cfg = make_cfg(teacher_dir, student_dir, steps=2, eval_every=2)
        cfg.sources.weights = {"student": Schedule(1.0)}
        cfg.sources.student = SamplingConfig(max_new_tokens=6)
        cfg.final_eval = False
        cfg.reward = reward
        train_mod.train(cfg, tmp_path / name)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [{k: v for k, v in r.items() if not k.endswith(("_per_s", "seconds"))} for r in rows]
    assert runs["plain"] == runs["zero"]
    assert "reward_mean" not in runs["zero"][0]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("plain", "zero"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fused", [True, False])
def test_the_term_on_real_models_fused_and_on_full_logits(models, fused):
    """Through the objective on real models, with cross-entropy mixed in (ce_weight 0.3): zero
    weights give the objective without the term (to rounding of the rescaled gradient); nonzero ones
    move loss and gradient, and the fused and full-logit paths agree on them."""
    cfg, tok, student, teacher = models
    cfg.loss.kind, cfg.loss.ce_weight = "fkl", 0.3
    data = train_mod.TrainData(cfg.data, tok, seed=0)
    batch = collate(data.next_pairs(4), tok.pad_token_id)
    t = as_teacher(teacher)

    def run(pg, fused=fused):
        student.zero_grad()
        terms = batch_loss(cfg.loss, student, t, batch, bf16=False, vocab=len(tok), fused=fused, pg_weights=pg)
        terms.loss.backward()
        return terms.loss.detach(), [p.grad.clone() for p in student.parameters()]

    base, base_grads = run(None)
    zero, zero_grads = run(torch.zeros(4))
    assert torch.equal(base, zero)
    assert all((a - b).abs().max() <= 1e-6 * b.abs().max() for a, b in zip(base_grads, zero_grads, strict=True))
    pg = torch.tensor([0.5, -0.5, 1.0, 0.0])
    moved, moved_grads = run(pg)
    assert not torch.equal(moved, base)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(base_grads, moved_grads, strict=True))
    other, other_grads = run(pg, fused=not fused)
    assert torch.allclose(moved, other, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(moved_grads, other_grads, strict=True))


def _user_rewards(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards:score"


def test_the_on_policy_source_samples_groups_and_weighs_them(models, tmp_path, monkeypatch):
    """With a reward term the student source takes batch_size / group prompts and samples each
    ``group`` times side by side; the user's function sees prompt, response and the row, and each
    sample's weight is alpha times its leave-one-out advantage."""
    cfg, tok, student, teacher = models
    spec = _user_rewards(tmp_path, monkeypatch, """
        seen = []
        def score(prompt, response, record):
            seen.append((prompt, response, record))
            return float(len(response))
    """)
    term = RewardTerm(Rewards(spec), 0.5, 3, lambda ids: tok.decode(ids, skip_special_tokens=True))
    ctx = SourceContext(cfg.sources, student, None, pad_id=tok.pad_token_id, stops=[tok.eos_token_id],
                        max_length=cfg.data.max_length, vocab=len(tok), reward=term)
    source = REGISTRY["student"]
    assert source.prompts(ctx, 6) == 2 and REGISTRY["dataset"].prompts(ctx, 6) == 6
    data = train_mod.TrainData(cfg.data, tok, seed=0)
    pairs, records = data.next_examples(2)
    got = source.sequences(pairs, ctx, step=0, seed=3, records=records)
    assert [p for p, _ in got.pairs] == [pairs[0][0]] * 3 + [pairs[1][0]] * 3
    import my_rewards

    assert [s[0] for s in my_rewards.seen] == [records[0].prompt] * 3 + [records[1].prompt] * 3
    assert my_rewards.seen[0][2]["prompt"] == records[0].prompt
    rewards = [float(len(tok.decode(r, skip_special_tokens=True))) for _, r in got.pairs]
    assert got.pg_weights == pytest.approx([0.5 * a for a in group_advantages(rewards, 3)])
    m = got.stats.metrics()
    assert m["reward_mean"] == pytest.approx(sum(rewards) / 6)
    assert m["reward_std"] == pytest.approx(torch.tensor(rewards).std(unbiased=False).item())
    plain = source.sequences(pairs, SourceContext(cfg.sources, student, None, pad_id=tok.pad_token_id,
                                                  stops=[tok.eos_token_id], max_length=cfg.data.max_length,
                                                  vocab=len(tok)), step=0, seed=3)
    assert plain.pg_weights is None and len(plain.pairs) == 2


def test_the_built_in_checker_is_the_reward():
    r = Rewards()
    recs = [Record("Write 12 in words.", "twelve", "builtin:spelling", "spelling"),
            Record("Ann has 3 coins. How many?", "#### 3", "builtin:arithmetic", "arithmetic")]
    assert r(recs, ["twelve", "#### 4"]) == [1.0, 0.0]
    with pytest.raises(DistillError, match=r"data.jsonl:7: no built-in checker"):
        r([Record("p", "c", "data.jsonl:7")], ["x"])


@pytest.mark.parametrize("body,message", [
    ("def score(prompt, response, record):\n    raise KeyError('answer')\n",
     r"data.jsonl:3: reward.fn=.* raised KeyError"),
    ("def score(prompt, response, record):\n    return float('nan')\n", r"data.jsonl:3: .* returned nan; a reward must "
                                                                        "be finite"),
    ("def score(prompt, response, record):\n    return 'good'\n", r"data.jsonl:3: .* returned 'good', not a number"),
])
def test_a_failing_reward_function_names_the_record(tmp_path, monkeypatch, body, message):
    spec = _user_rewards(tmp_path, monkeypatch, body)
    with pytest.raises(DistillError, match=message) as e:
        Rewards(spec)([Record("p", "c", "data.jsonl:3")], ["x"])
    assert "\n" not in str(e.value)


def test_a_reward_function_that_cannot_be_loaded_is_refused(tmp_path, monkeypatch):
    spec = _user_rewards(tmp_path, monkeypatch, "def other():\n    pass\n")
    with pytest.raises(DistillError, match="has no function 'score'"):
        Rewards(spec)
    with pytest.raises(DistillError, match="cannot import no_such_module_here"):
        Rewards("no_such_module_here:score")


@pytest.mark.parametrize("change,message", [
    (dict(weights={"dataset": Schedule(1.0)}), "needs the student's own samples"),
    (dict(group=1), "reward.group must be >= 2"),
    (dict(group=3), "multiple of reward.group=3"),
    (dict(fn="not a spec"), "module:function"),
    (dict(alpha=-1.0), "reward.alpha must be >= 0"),
])
def test_reward_settings_are_checked_before_anything_loads(teacher_dir, student_dir, change, message):
    cfg = make_cfg(teacher_dir, student_dir)
    cfg.sources.weights = change.pop("weights", {"student": Schedule(1.0)})
    cfg.reward = RewardConfig(**{"alpha": 0.5, **change})
    with pytest.raises(DistillError, match=message):
        validate(cfg)


def test_a_run_with_a_reward_logs_it_and_the_sampled_evaluation(teacher_dir, student_dir, tmp_path):
    """On-policy GKD with the task reward on the built-in tasks: the train rows carry the reward's
    mean and spread; validation and the test report carry mean@n, pass@n and distinct@n."""
    cfg = make_cfg(teacher_dir, student_dir, steps=2, eval_every=2)
    cfg.sources.weights = {"student": Schedule(1.0)}
    cfg.sources.student = SamplingConfig(max_new_tokens=6)
    cfg.reward = RewardConfig(alpha=0.5, group=2)
    cfg.eval.samples = 3
    train_mod.train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(0 <= r["reward_mean"] <= 1 and r["reward_std"] >= 0 for r in train)
    val = [r for r in rows if r["split"] == "validation"][-1]
    assert {"mean@3", "pass@3", "distinct@3", "arithmetic/mean@3", "spelling/pass@3"} <= val.keys()
    assert all(math.isfinite(val[k]) for k in ("mean@3", "pass@3"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"mean@3", "pass@3", "distinct@3"} <= report["test"]["student after"].keys()
    assert "3 samples per prompt" in report["evaluation"]


@pytest.mark.slow
def test_the_term_moves_the_policy_towards_the_reward_and_a_reversed_reward_away(student_dir, tmp_path,
                                                                                  monkeypatch):
    """End to end, the student as its own teacher (the divergence starts at zero, so the policy
    gradient steers): a reward for characters with even code points raises their share in the
    student's samples, and the reversed reward lowers it, against the untrained student measured
    on the same prompts and seeds. A sign error in the term, or advantages paired with the wrong
    samples, moves both runs alike and fails."""
    spec = _user_rewards(tmp_path, monkeypatch, """
        def even_share(text):  # dense: any token choice moves it, on a random model's random text
            return sum(ord(c) % 2 == 0 for c in text) / max(len(text), 1)
        def even(prompt, response, record):
            return even_share(response)
        def odd(prompt, response, record):
            return 1.0 - even_share(response)
    """).removesuffix(":score")
    import my_rewards
    tok = load_tokenizer(student_dir)
    records = train_mod.TrainData(make_cfg(student_dir, student_dir).data, tok, seed=0).next_examples(16)[1]

    def share(model_dir) -> float:
        model = load_model(make_cfg(student_dir, model_dir).student, "s", torch.device("cpu"))
        texts = generate_samples(model, tok, records, EvalConfig(samples=8), seed=0, what="test",
                                 max_new_tokens=8, batch_size=16, max_length=96)
        return sum(my_rewards.even_share(t) for ts in texts for t in ts) / sum(map(len, texts))

    shares = {}
    for fn in ("even", "odd"):
        cfg = make_cfg(student_dir, student_dir, steps=30, eval_every=1000, save_every=1000, lr=1e-2)
        cfg.sources.weights = {"student": Schedule(1.0)}
        cfg.sources.student = SamplingConfig(max_new_tokens=8)
        cfg.reward = RewardConfig(alpha=5.0, group=2, fn=f"{spec}:{fn}")
        cfg.trainer.batch_size = 16
        train_mod.train(cfg, tmp_path / fn)
        shares[fn] = share(tmp_path / fn / "model")
    before = share(student_dir)
    assert shares["even"] > before + 0.05 and shares["odd"] < before - 0.05, (before, shares)
