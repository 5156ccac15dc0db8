"""How good a draft model is for its target (DistillSpec metrics, Leviathan et al. 2023).

On held-out prompts:
- alpha from the logits: beta_t = sum_v min(p_t(v), q_t(v)) = 1 - TVD(p_t, q_t) at every position
  of continuations sampled from the target; alpha = E[beta];
- measured acceptance per draft position and block efficiency tau (tokens per target forward) from
  real speculative sampling, for each gamma; predicted tau(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha);
- c = draft forward time / target forward time (one cached decoding step each);
- predicted speedup tau / (c gamma + 1), and the measured wall-clock speedup of speculative
  sampling over the target sampling alone (Hugging Face ``generate``).
Writes ``draft_eval.json``, ``draft_eval.md`` and ``draft_eval.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import ASSETS, DataConfig
from distill.data import builtin_records, read_records
from distill.errors import DistillError
from distill.models import check_same_tokenizer, resolve_device
from distill.speculative import SpeculativeStats, speculative_generate


@dataclass
class DraftEvalConfig:
    """``distill eval-draft`` options (key=value on the command line)."""

    target: str = str(ASSETS / "teacher")
    draft: str = str(ASSETS / "student")
    prompts: str | None = None  # JSONL/csv/parquet with prompts; default: the built-in test split
    num_prompts: int = 64
    max_new_tokens: int = 48
    gammas: list[int] = field(default_factory=lambda: list(range(1, 9)))
    temperature: float = 1.0
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    out: str = "draft_eval"


def _prompts(cfg: DraftEvalConfig, tokenizer) -> list[str]:
    if cfg.prompts is None:
        records = builtin_records(DataConfig(), "test", cfg.num_prompts)
    else:
        records = read_records(Path(cfg.prompts), DataConfig(), tokenizer)[: cfg.num_prompts]
    return [r.prompt for r in records]


def _batches(tokenizer, prompts: list[str], size: int, device):
    for i in range(0, len(prompts), size):
        yield tokenizer(prompts[i: i + size], return_tensors="pt", padding=True).to(device)


@torch.no_grad()
def _alpha_from_logits(target, draft, tokenizer, prompts, cfg, device) -> tuple[float, list[float]]:
    """Mean of 1 - TVD(p_t, q_t) over the response positions of target samples, and its mean by
    response position (0-based)."""
    sums = torch.zeros(cfg.max_new_tokens, dtype=torch.float64)
    counts = torch.zeros(cfg.max_new_tokens, dtype=torch.float64)
    for enc in _batches(tokenizer, prompts, cfg.batch_size, device):
        seqs = target.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                               max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        mask = (seqs != tokenizer.pad_token_id).long()
        mask[:, : enc.input_ids.shape[1]] = enc.attention_mask
        v = min(target.config.vocab_size, draft.config.vocab_size)
        p = torch.softmax(target(seqs, attention_mask=mask).logits[..., :v].float() / cfg.temperature, -1)
        q = torch.softmax(draft(seqs, attention_mask=mask).logits[..., :v].float() / cfg.temperature, -1)
        # Position t predicts token t + 1; the response's j-th token is predicted at start + j.
        start = enc.input_ids.shape[1] - 1
        beta = torch.minimum(p, q).sum(-1)[:, start:-1].double().cpu()
        valid = mask[:, start + 1:].double().cpu()
        n = beta.shape[1]
        sums[:n] += (beta * valid).sum(0)
        counts[:n] += valid.sum(0)
    seen = counts > 0
    return float(sums.sum() / counts.sum()), (sums[seen] / counts[seen]).tolist()


@torch.no_grad()
def _step_time(model, tokenizer, prompts, cfg, device) -> float:
    """Seconds per cached decoding step of one model (greedy, fixed length, batched)."""
    enc = next(_batches(tokenizer, prompts, cfg.batch_size, device))
    n = 32
    model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    t0 = time.perf_counter()
    model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return (time.perf_counter() - t0) / n


def evaluate_draft(cfg: DraftEvalConfig) -> dict:
    """Run the evaluation; write JSON, Markdown and PNG under ``cfg.out``; return the results."""
    for role in ("target", "draft"):
        if not Path(getattr(cfg, role)).is_dir():
            raise DistillError(f"eval-draft: {role} directory not found: {getattr(cfg, role)}")
    if not cfg.gammas or min(cfg.gammas) < 1:
        raise DistillError(f"eval-draft: gammas must be >= 1; got {cfg.gammas}")
    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(cfg.target, padding_side="left")
    check_same_tokenizer(AutoTokenizer.from_pretrained(cfg.draft), tokenizer, cfg.draft, cfg.target)
    target = AutoModelForCausalLM.from_pretrained(cfg.target).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(cfg.draft).to(device).eval()
    prompts = _prompts(cfg, tokenizer)
    torch.manual_seed(cfg.seed)

    alpha, alpha_by_pos = _alpha_from_logits(target, draft, tokenizer, prompts, cfg, device)
    c = _step_time(draft, tokenizer, prompts, cfg, device) / _step_time(target, tokenizer, prompts, cfg, device)

    def sample_alone() -> float:
        t0 = time.perf_counter()
        for enc in _batches(tokenizer, prompts, cfg.batch_size, device):
            target.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                            max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - t0

    baseline_s = sample_alone()
    rows = []
    for gamma in cfg.gammas:
        gen = torch.Generator(device=device).manual_seed(cfg.seed + gamma)
        stats = SpeculativeStats(gamma)
        t0 = time.perf_counter()
        for enc in _batches(tokenizer, prompts, cfg.batch_size, device):
            out = speculative_generate(target, draft, enc.input_ids, attention_mask=enc.attention_mask, gamma=gamma,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       generator=gen)
            stats.merge(out.stats)
        seconds = time.perf_counter() - t0
        tau_pred = (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1.0
        tau = stats.block_efficiency
        rows.append({
            "gamma": gamma, "acceptance_rate": stats.acceptance_rate,
            "acceptance_by_draft_position": stats.acceptance_by_position,
            "tau_measured": tau, "tau_predicted": tau_pred,
            "speedup_predicted": tau_pred / (c * gamma + 1),
            "speedup_predicted_from_measured_tau": tau / (c * gamma + 1),
            "speedup_measured": baseline_s / seconds, "seconds": seconds,
        })
    result = {"config": asdict(cfg), "device": str(device), "prompts": len(prompts), "alpha": alpha,
              "alpha_by_response_position": alpha_by_pos, "c": c, "target_alone_seconds": baseline_s, "by_gamma": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "draft_eval.md").write_text(markdown(result))
    plot(result, out / "draft_eval.png")
    return result


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Draft `{cfg['draft']}` for target `{cfg['target']}`: {result['prompts']} prompts, "
        f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, {result['device']}.", "",
        f"- alpha (mean 1 - TVD over target samples): **{result['alpha']:.3f}**",
        f"- c (draft step / target step): {result['c']:.3f}", "",
        "| gamma | acceptance (measured) | tau measured | tau predicted | speedup predicted | speedup measured |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["by_gamma"]:
        lines.append(f"| {r['gamma']} | {r['acceptance_rate']:.3f} | {r['tau_measured']:.2f} "
                     f"| {r['tau_predicted']:.2f} | {r['speedup_predicted']:.2f} | {r['speedup_measured']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["gamma"] for r in result["by_gamma"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(g, [r["tau_measured"] for r in result["by_gamma"]], "o-", label="measured")
    a.plot(g, [r["tau_predicted"] for r in result["by_gamma"]], "s--",
           label=f"predicted (alpha={result['alpha']:.2f})")
    a.set(xlabel="gamma", ylabel="tau (tokens per target forward)", title="block efficiency")
    b.plot(g, [r["speedup_measured"] for r in result["by_gamma"]], "o-", label="measured (wall clock)")
    b.plot(g, [r["speedup_predicted"] for r in result["by_gamma"]], "s--", label=f"predicted (c={result['c']:.2f})")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set(xlabel="gamma", ylabel="speedup over the target alone", title="speedup")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
