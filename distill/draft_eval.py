"""How good a draft model is for its target (DistillSpec metrics, Leviathan et al. 2023).

On held-out prompts:
- alpha from the logits: beta_t = sum_v min(p_t(v), q_t(v)) = 1 - TVD(p_t, q_t) at every position
  of continuations sampled from the target; alpha = E[beta];
- measured acceptance per draft position and block efficiency tau (tokens per round and sequence,
  before EOS or the length limit cut the last round short) from real speculative sampling, for
  each gamma; predicted tau(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha);
- c = draft step time / target step time (one cached decoding step each, prefill excluded, medians);
- predicted speedup tau / (c gamma + 1); the same with the measured cost v of the target's forward
  over gamma + 1 tokens (in target steps) in place of 1: tau / (c gamma + v);
- the measured wall-clock speedup of speculative sampling over sampling from the target alone
  (Hugging Face ``generate``), both generating exactly ``max_new_tokens`` per sequence so that
  they do the same work.
Writes ``draft_eval.json``, ``draft_eval.md`` and ``draft_eval.png``.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress
from transformers import AutoModelForCausalLM, DynamicCache

from distill.config import ASSETS, DataConfig, gguf_directory_problem
from distill.data import IGNORE_INDEX, builtin_records, left_pad, prompt_ids, read_records
from distill.errors import DistillError
from distill.losses import divergence
from distill.models import check_same_tokenizer, load_tokenizer, resolve_device
from distill.progress import progress_display, showing
from distill.speculative import SpeculativeStats, cache_kwargs, check_draft_vocab, speculative_generate
from distill.tasks import check_builtin


@dataclass
class DraftEvalConfig:
    """``distill eval-draft`` options (key=value on the command line)."""

    target: str = str(ASSETS / "teacher")
    draft: str = str(ASSETS / "student")
    name: str | None = None  # what the draft is, for the report (default: its directory)
    prompts: str | None = None  # JSONL/csv/parquet with prompts; default: the built-in test split
    # The fields of a prompts file (as data.prompt_field and data.messages_field of a run).
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    # Without prompts: the built-in tasks and arithmetic difficulty whose test split is used.
    tasks: list[str] = field(default_factory=lambda: list(DataConfig().tasks))
    difficulty: str = DataConfig().difficulty
    num_prompts: int = 64
    max_new_tokens: int = 48
    gammas: list[int] = field(default_factory=lambda: list(range(1, 9)))
    temperature: float = 1.0
    batch_size: int = 16
    repeats: int = 5  # every wall-clock time is the median of this many runs
    seed: int = 0
    device: str = "auto"
    out: str = "draft_eval"
    progress: bool = True  # rich progress rows (stderr)

    def validate(self) -> None:
        for role in ("target", "draft"):
            if not Path(getattr(self, role)).is_dir():
                raise DistillError(f"{role} directory not found: {getattr(self, role)}")
            if problem := gguf_directory_problem(getattr(self, role)):
                raise DistillError(f"{role}: {problem}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise DistillError(f"prompts file not found: {self.prompts}")
        if not self.gammas or min(self.gammas) < 1:
            raise DistillError(f"gammas must be >= 1; got {self.gammas}")
        for key in ("num_prompts", "max_new_tokens", "batch_size", "repeats"):
            if getattr(self, key) < 1:
                raise DistillError(f"{key} must be >= 1; got {getattr(self, key)}")
        if not self.temperature > 0:
            raise DistillError(f"temperature must be > 0; got {self.temperature}")
        if self.prompts is None:
            check_builtin(self.tasks, self.difficulty)


def _prompts(cfg: DraftEvalConfig, tokenizer, room: int) -> list[list[int]]:
    """Token ids of the prompts, tokenized as training does; each must leave ``room`` positions."""
    if cfg.prompts is None:
        records = builtin_records(DataConfig(tasks=list(cfg.tasks), difficulty=cfg.difficulty), "test",
                                  cfg.num_prompts)
    else:
        fields = DataConfig(prompt_field=cfg.prompt_field, messages_field=cfg.messages_field)
        records = read_records(Path(cfg.prompts), fields, tokenizer, require_completion=False)[: cfg.num_prompts]
    if not records:
        raise DistillError(f"no prompts in {cfg.prompts or 'the built-in test split'}")
    ids = [prompt_ids(r, tokenizer) for r in records]
    for r, p in zip(records, ids, strict=True):
        if len(p) > room:
            raise DistillError(
                f"{r.source}: prompt is {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} "
                f"and gamma={max(cfg.gammas)} the models' context leaves room for {room}"
            )
    return ids


def prompts_source(cfg: DraftEvalConfig) -> str:
    """Where the prompts come from, in words (the report names them)."""
    if cfg.prompts is not None:
        return f"{cfg.prompts}"
    return f"the built-in test split ({', '.join(cfg.tasks)}; difficulty {cfg.difficulty})"


def _batches(prompts: list[list[int]], size: int, pad_id: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded (input_ids, attention_mask) batches on ``device``, built once for every pass."""
    return [tuple(x.to(device) for x in left_pad(prompts[i: i + size], pad_id)) for i in range(0, len(prompts), size)]


def _eos_ids(target, tokenizer) -> list[int]:
    eos = target.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def response_mask(new_tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """True for generated tokens up to and including each row's first EOS: the padding after it
    is not part of the response, even where the pad id equals the EOS id."""
    is_eos = torch.isin(new_tokens, eos_ids).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def predicted_block_efficiency(alpha: float, gamma: int) -> float:
    """tau(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha): expected tokens per target forward when each
    draft is accepted independently with probability alpha (gamma + 1 at alpha = 1)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def predicted_speedup(tau: float, c: float, gamma: int, verify_cost: float = 1.0) -> float:
    """tau / (c gamma + v): tokens per round over the round's cost in target steps (gamma draft
    steps at c each, and the target's verification forward at v, 1 in the paper's model)."""
    return tau / (c * gamma + verify_cost)


@torch.no_grad()
def acceptance_on(target, draft, seqs: torch.Tensor, prompt_mask: torch.Tensor, eos_ids: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta = 1 - TVD(p_t, q_t) at every response position of ``seqs`` (left-padded prompts of
    ``prompt_mask``'s width, then responses) and whether the position counts (through the
    response's first EOS): two [B, response length] tensors."""
    real = response_mask(seqs[:, prompt_mask.shape[1]:], eos_ids)
    full = torch.cat([prompt_mask, real.long()], 1)
    # Position t predicts token t + 1: the response's j-th token is predicted at start + j.
    # The draft's rows beyond the target's vocabulary drop out (align_vocab), as in sampling.
    start = prompt_mask.shape[1] - 1
    p_logits = target(seqs, attention_mask=full).logits[:, start:-1]
    q_logits = draft(seqs, attention_mask=full).logits[:, start:-1]
    labels = torch.where(real, 0, IGNORE_INDEX)
    tvd = divergence(q_logits, p_logits, labels, kind="tvd", temperature=temperature, reduction="none")
    return 1 - tvd, real


@torch.no_grad()
def _alpha_from_logits(target, draft, batches, cfg, pad_id, eos, advance=lambda tokens: None
                       ) -> tuple[float, list[float]]:
    """Mean of beta over the response positions of target samples (through their first EOS), and
    its mean by response position (0-based). ``advance(tokens)`` after each batch."""
    sums = torch.zeros(cfg.max_new_tokens, dtype=torch.float64)
    counts = torch.zeros(cfg.max_new_tokens, dtype=torch.float64)
    for ids, mask in batches:
        seqs = target.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                               top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                               eos_token_id=eos)
        beta, real = acceptance_on(target, draft, seqs, mask, torch.tensor(eos, dtype=torch.long, device=ids.device),
                                   cfg.temperature)
        valid = real.double().cpu()
        n = beta.shape[1]
        sums[:n] += (beta.double().cpu() * valid).sum(0)
        counts[:n] += valid.sum(0)
        advance(int(valid.sum()))
    seen = counts > 0
    return float(sums.sum() / counts.sum()), (sums[seen] / counts[seen]).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fns, repeats: int, device: torch.device) -> list[float]:
    """Median wall-clock seconds of each of ``fns`` over ``repeats`` runs after one warm-up round,
    the functions interleaved so that drift on the machine hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats + 1):
        for k, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t[1:]) for t in times]


@torch.no_grad()
def _forward_costs(target, draft, ids, mask, gammas: list[int], repeats: int, device: torch.device,
                   steps: int = 64, advance=lambda: None) -> tuple[float, dict[int, float]]:
    """c (draft step / target step) and, for each gamma, v (target forward over gamma + 1 tokens /
    target step). A step is one cached forward of one new token per sequence after the prompt;
    each forward is cropped back, so all see the same context. Every configuration is timed once
    per repeat, interleaved, so that drift on the machine hits all alike; medians of ``repeats``
    after one warm-up round. ``advance()`` after each timed run."""
    configs = [(draft, 1), (target, 1)] + [(target, g + 1) for g in gammas]
    times: list[list[float]] = [[] for _ in configs]
    for _ in range(repeats + 1):
        for k, (model, n) in enumerate(configs):
            cache = DynamicCache()
            model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache))
            x = ids[:, -1:].repeat(1, n)
            m = torch.cat([mask, mask.new_ones(mask.shape[0], n)], 1)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                model(input_ids=x, attention_mask=m, use_cache=True, **cache_kwargs(model, cache))
                cache.crop(-n)
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            advance()
    med = [statistics.median(t[1:]) for t in times]
    return med[0] / med[1], {g: v / med[1] for g, v in zip(gammas, med[2:], strict=True)}


def evaluate_draft(cfg: DraftEvalConfig) -> dict:
    """Run the evaluation; write JSON, Markdown and PNG under ``cfg.out``; return the results."""
    cfg.validate()
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.target, "target")
    check_same_tokenizer(load_tokenizer(cfg.draft, "draft"), tokenizer, cfg.draft, cfg.target)
    target = AutoModelForCausalLM.from_pretrained(cfg.target).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(cfg.draft).to(device).eval()
    try:
        check_draft_vocab(target, draft)
    except ValueError as e:
        raise DistillError(f"{cfg.draft}: {e}") from None
    positions = min(getattr(m.config, "max_position_embeddings", 1 << 30) for m in (target, draft))
    prompts = _prompts(cfg, tokenizer, room=positions - cfg.max_new_tokens - max(cfg.gammas) - 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(target, tokenizer)
    batches = _batches(prompts, cfg.batch_size, pad_id, device)
    torch.manual_seed(cfg.seed)
    with progress_display(cfg.progress, auto_refresh=False) as progress:  # it times code: no drawing thread
        result = _measure(cfg, target, draft, batches, pad_id, eos, device, progress)
    result.update(config=asdict(cfg), name=cfg.name or cfg.draft, device=str(device), prompts=len(prompts),
                  prompts_from=prompts_source(cfg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "draft_eval.md").write_text(markdown(result))
    plot({result["name"]: result}, out / "draft_eval.png")
    return result


def _measure(cfg: DraftEvalConfig, target, draft, batches, pad_id: int, eos: list[int], device: torch.device,
             progress: Progress) -> dict:
    """alpha, c and the rows by gamma, each phase a progress row (generated tokens/s where known)."""
    with showing(progress, "alpha (target samples)", len(batches)) as advance:
        alpha, alpha_by_pos = _alpha_from_logits(target, draft, batches, cfg, pad_id, eos, advance)
    with showing(progress, "c and v (forward timing)", (cfg.repeats + 1) * (len(cfg.gammas) + 2)) as advance:
        c, verify_cost = _forward_costs(target, draft, *batches[0], gammas=cfg.gammas, repeats=cfg.repeats,
                                        device=device, advance=advance)

    # Wall clock: every sequence generates exactly max_new_tokens (EOS ignored), so that the
    # target alone and speculative decoding do the same work whatever the samples.
    def target_alone(advance) -> None:
        for ids, mask in batches:
            target.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                            top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                            min_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
            advance(ids.shape[0] * cfg.max_new_tokens)

    rows = []
    for gamma in cfg.gammas:
        gen = torch.Generator(device=device).manual_seed(cfg.seed + gamma)

        def speculative(advance, gamma: int = gamma, gen: torch.Generator = gen, eos: list[int] = eos
                        ) -> SpeculativeStats:
            stats = SpeculativeStats(gamma)
            for ids, mask in batches:
                out = speculative_generate(target, draft, ids, attention_mask=mask, gamma=gamma,
                                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                           eos_token_id=eos, pad_token_id=pad_id, generator=gen)
                stats.merge(out.stats)
                advance(out.stats.emitted)
            return stats

        with showing(progress, f"gamma {gamma}: acceptance", len(batches)) as advance:
            stats = speculative(advance)  # acceptance on the samples as they are, stopping at EOS
        with showing(progress, f"gamma {gamma}: wall clock", 2 * (cfg.repeats + 1) * len(batches)) as advance:
            baseline_s, seconds = _median_seconds(
                [functools.partial(target_alone, advance), functools.partial(speculative, advance, eos=[])],
                cfg.repeats, device)
        tau_pred = predicted_block_efficiency(alpha, gamma)
        tau = stats.block_efficiency
        # The speedup formula prices the target's verification of gamma + 1 tokens as one step;
        # v is what it costs here (about 1 on a GPU at small batch, more where compute-bound).
        v = verify_cost[gamma]
        rows.append({
            "gamma": gamma, "acceptance_rate": stats.acceptance_rate,
            "acceptance_by_draft_position": stats.acceptance_by_position,
            "tau_measured": tau, "tau_predicted": tau_pred,
            "speedup_predicted": predicted_speedup(tau_pred, c, gamma),
            "speedup_predicted_from_measured_tau": predicted_speedup(tau, c, gamma),
            "verify_cost": v, "speedup_predicted_with_verify_cost": predicted_speedup(tau, c, gamma, v),
            "speedup_measured": baseline_s / seconds, "seconds": seconds, "target_alone_seconds": baseline_s,
        })
    return {"alpha": alpha, "alpha_by_response_position": alpha_by_pos, "c": c, "by_gamma": rows}


def markdown(result: dict) -> str:
    """The report as Markdown: alpha, c and a row per gamma."""
    cfg = result["config"]
    lines = [
        f"Draft: {result['name']}. Target: `{Path(cfg['target']).name}`. {result['prompts']} prompts from "
        f"{result.get('prompts_from', 'the built-in test split')}, "
        f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, batches of {cfg['batch_size']}, "
        f"{result['device']}; wall-clock times are medians of {cfg['repeats']} runs.", "",
        f"- alpha (mean 1 - TVD over target samples): **{result['alpha']:.3f}**",
        f"- c (draft step / target step): {result['c']:.3f}", "",
        "| gamma | acceptance (measured) | tau measured | tau predicted | speedup predicted | v (verify cost) "
        "| speedup predicted with v | speedup measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["by_gamma"]:
        lines.append(f"| {r['gamma']} | {r['acceptance_rate']:.3f} | {r['tau_measured']:.2f} "
                     f"| {r['tau_predicted']:.2f} | {r['speedup_predicted']:.2f} | {r['verify_cost']:.2f} "
                     f"| {r['speedup_predicted_with_verify_cost']:.2f} | {r['speedup_measured']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    """tau and speedup against gamma, and alpha along the response, for one or more drafts
    (``{label: result}``; one color per draft)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for k, (label, r) in enumerate(results.items()):
        color, name = f"C{k}", (f"{label}, " if len(results) > 1 else "")
        g = [x["gamma"] for x in r["by_gamma"]]
        a.plot(g, [x["tau_measured"] for x in r["by_gamma"]], "o-", color=color, label=f"{name}measured")
        a.plot(g, [x["tau_predicted"] for x in r["by_gamma"]], "--", color=color,
               label=f"{name}predicted (alpha={r['alpha']:.2f})")
        b.plot(g, [x["speedup_measured"] for x in r["by_gamma"]], "o-", color=color, label=f"{name}measured")
        b.plot(g, [x["speedup_predicted"] for x in r["by_gamma"]], "--", color=color,
               label=f"{name}predicted (c={r['c']:.2f})")
        b.plot(g, [x["speedup_predicted_with_verify_cost"] for x in r["by_gamma"]], ":", color=color,
               label=f"{name}predicted with measured verify cost")
        by_pos = r["alpha_by_response_position"]
        c.plot(range(1, len(by_pos) + 1), by_pos, ".-", color=color, label=f"{name}mean {r['alpha']:.2f}")
    a.set(xlabel="gamma", ylabel="tau (tokens per target forward)", title="block efficiency")
    b.axhline(1.0, color="black", lw=0.8)
    b.set(xlabel="gamma", ylabel="speedup over the target alone", title="speedup (wall clock)")
    c.set(xlabel="response position", ylabel="alpha = 1 - TVD(p, q)", ylim=(0, 1), title="alpha along the response")
    for ax in (a, b, c):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
