"""The sources' sampler (``distill.generation.sample``): its cost against transformers'
``generate``, and whether its samples follow the distribution it was asked for.

1. Speed: ``sample`` (what the student and teacher sources call) against a bare ``model.generate``
   with the same settings, and a minimal KV-cached greedy loop against greedy ``generate`` (the
   loop must give the same tokens); medians of interleaved repeats, on built-in test prompts, for
   the shipped student and teacher. ``sample`` keeps ``generate`` unless the lean loop is clearly
   faster.
2. Fidelity: for the test prompt where the shipped student is least sure of its next token, many
   draws of that token through ``sample`` at each setting (temperature, top-k, top-p), against the
   exact filtered distribution computed here from the logits: total variation distance, with a
   negative control (the same draws against the distribution at temperature 1 without filtering,
   which a sampler that ignored the setting would follow).
Writes ``sampling.json`` and ``sampling.md``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import distill.generation as sampling  # through the module: tests plant a broken sampler here
from benchmarks.environment import environment
from benchmarks.metrics import metric, synchronize, write_json
from distill.config import ASSETS, DataConfig, ModelConfig, SamplingConfig
from distill.data import builtin_records, left_pad, prompt_ids, stop_ids
from distill.models import load_model, load_tokenizer
from distill.speculative import cache_kwargs

SETTINGS = {"temperature 0.7, top-p 0.9": SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=1),
            "temperature 1.5, top-k 20": SamplingConfig(temperature=1.5, top_k=20, max_new_tokens=1)}


@torch.no_grad()
def lean_greedy(model, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: int, pad: int) -> torch.Tensor:
    """Greedy decoding with a KV cache and nothing else."""
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_kwargs(model, cache))
    tokens, done = [], torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(new):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **cache_kwargs(model, cache))
    return torch.stack(tokens, 1)


def filtered(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution ``cfg`` asks for, from one row of logits: temperature, then top-k, then top-p
    (the smallest set of most likely tokens whose mass reaches top_p)."""
    p = torch.softmax(logits.double() / cfg.temperature, -1)
    if cfg.top_k:
        p = torch.where(p >= p.topk(cfg.top_k).values[-1], p, 0.0)
    if cfg.top_p < 1.0:
        sorted_p, order = (p / p.sum()).sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p  # mass before each token below top_p
        p = torch.zeros_like(p).scatter(0, order[keep], p[order[keep]])
    return p / p.sum()


def fidelity(model, tok, prompts: list[list[int]], draws: int, seed: int) -> dict[str, dict[str, float]]:
    """Total variation distance of sampled next tokens from the asked-for distribution, per setting."""
    with torch.no_grad():
        ids, mask = left_pad(prompts, tok.pad_token_id)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, -1].cpu()
    p1 = torch.softmax(logits.double(), -1)
    worst = int((-(p1 * p1.clamp_min(1e-30).log()).sum(-1)).argmax())  # the most uncertain prompt
    out = {}
    for name, cfg in SETTINGS.items():
        counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
        per_call = 512
        for i in range(draws // per_call):
            got = sampling.sample(model, [prompts[worst]] * per_call, cfg, pad_id=tok.pad_token_id, stops=[],
                                  seed=seed * 1000 + i)
            counts += torch.bincount(torch.tensor([r[0] for r in got]), minlength=counts.numel()).double()
        empirical = counts / counts.sum()
        out[name] = {"tv": float((empirical - filtered(logits[worst], cfg)).abs().sum() / 2),
                     "tv_control": float((empirical - p1[worst]).abs().sum() / 2)}
    return out


def speed(model, tok, ids: torch.Tensor, mask: torch.Tensor, new: int, repeats: int, seed: int) -> dict:
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    cfg = SamplingConfig(max_new_tokens=new)

    def hf(greedy: bool):
        with torch.no_grad():
            kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, eos_token_id=eos,
                                 pad_token_id=pad, **kw)
        return out[:, ids.shape[1]:]

    fns = {"generate (greedy)": lambda: hf(True), "lean loop (greedy)": lambda: lean_greedy(model, ids, mask, new,
                                                                                           eos, pad),
           "generate (sampling)": lambda: (torch.manual_seed(seed), hf(False)),
           "sample (sampling)": lambda: sampling.sample(model, prompts, cfg, pad_id=pad, stops=[eos], seed=seed)}
    a, b = fns["generate (greedy)"](), fns["lean loop (greedy)"]()
    width = max(a.shape[1], b.shape[1])
    same = torch.equal(torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad),
                       torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: drift on the machine hits all alike
        for name, fn in fns.items():
            synchronize(ids.device)
            t0 = time.perf_counter()
            fn()
            synchronize(ids.device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"same_tokens": same, "seconds": med,
            "lean_over_generate": med["lean loop (greedy)"] / med["generate (greedy)"],
            "sample_over_generate": med["sample (sampling)"] / med["generate (sampling)"]}


def run(out: Path, seed: int = 0, prompts: int = 32, new: int = 48, repeats: int = 7, draws: int = 8192,
        device: str = "cpu") -> dict:
    dev = torch.device(device)
    tok = load_tokenizer(ASSETS / "teacher")
    test = [prompt_ids(r, tok) for r in builtin_records(DataConfig(), "test", prompts)]
    ids, mask = (x.to(dev) for x in left_pad(test, tok.pad_token_id))
    models, metrics = {}, {}
    for role in ("student", "teacher"):
        model = load_model(ModelConfig(path=str(ASSETS / role)), role, dev).eval()
        models[role] = speed(model, tok, ids, mask, new, repeats, seed)
        metrics[f"{role} sample over generate"] = metric(models[role]["sample_over_generate"], "lower", "ratio")
        if role == "student":
            fid = fidelity(model, tok, test, draws, seed)
    assert stop_ids(tok) == [tok.eos_token_id]  # the speed comparison stops both at EOS alone
    metrics |= {f"tv {name}": metric(v["tv"], "lower", "quality") for name, v in fid.items()}
    result = {"environment": environment(), "prompts": prompts, "new_tokens": new, "repeats": repeats,
              "draws": draws, "models": models, "fidelity": fid, "metrics": metrics}
    write_json(out / "sampling.json", result)
    lines = [f"Decoding {prompts} built-in test prompts (batch of {prompts}), up to {new} new tokens, {device}, "
             f"{torch.get_num_threads()} CPU threads; medians of {repeats} interleaved runs.", "",
             "| model | sample / generate (sampling) | lean loop / generate (greedy) | lean loop same tokens |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['sample_over_generate']:.2f} | {v['lean_over_generate']:.2f} | {v['same_tokens']} |"
              for k, v in models.items()]
    lines += ["", f"Fidelity: {draws} draws of the shipped student's next token on its least certain test prompt.",
              "", "| setting | TV to the asked-for distribution | TV to temperature 1, unfiltered (control) |",
              "|---|---|---|"]
    lines += [f"| {k} | {v['tv']:.4f} | {v['tv_control']:.4f} |" for k, v in fid.items()]
    (out / "sampling.md").write_text("\n".join(lines) + "\n")
    return result
