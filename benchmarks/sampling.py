"""Should the student and teacher sources sample with transformers' ``generate`` or a leaner loop?

    python benchmarks/sampling.py [--prompts 32] [--new 48] [--repeats 7] [--out benchmarks/results]

A minimal KV-cached greedy loop (one forward per token, argmax, EOS bookkeeping) against
``model.generate`` on the shipped teacher and student, on built-in test prompts: both must give
the same tokens; the wall-clock times (medians, the two interleaved) and their ratio go to
``sampling.json`` / ``sampling.md``. ``distill.sources.sampling`` keeps ``generate`` unless the
lean loop is clearly faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from environment import environment
from transformers import DynamicCache

from distill.config import ASSETS, DataConfig, ModelConfig
from distill.data import builtin_records, left_pad, prompt_ids
from distill.models import load_model, load_tokenizer
from distill.speculative import cache_kwargs


@torch.no_grad()
def lean_greedy(model, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: int, pad: int) -> torch.Tensor:
    """Greedy decoding with a KV cache and nothing else."""
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_kwargs(model, cache))
    tokens, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    tok = load_tokenizer(ASSETS / "teacher")
    ids, mask = left_pad([prompt_ids(r, tok) for r in builtin_records(DataConfig(), "test", args.prompts)],
                         tok.pad_token_id)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = {}
    for role in ("student", "teacher"):
        model = load_model(ModelConfig(path=str(ASSETS / role)), role, torch.device("cpu")).eval()

        def hf(model=model):
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad)
            return out[:, ids.shape[1]:]

        def lean(model=model):
            return lean_greedy(model, ids, mask, args.new, eos, pad)

        a, b = hf(), lean()
        width = max(a.shape[1], b.shape[1])
        same = torch.equal(torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad),
                           torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad))
        times = {"generate": [], "lean": []}
        for _ in range(args.repeats):  # interleaved: drift on the machine hits both alike
            for name, fn in (("generate", hf), ("lean", lean)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[role] = {"same_tokens": same, "generate_s": med["generate"], "lean_s": med["lean"],
                      "lean_over_generate": med["lean"] / med["generate"]}
    result = {"environment": environment(), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "prompts": args.prompts, "new_tokens": args.new, "repeats": args.repeats, "models": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Greedy decoding of {args.prompts} built-in test prompts, up to {args.new} new tokens, batch of "
             f"{args.prompts}, {torch.get_num_threads()} CPU threads; medians of {args.repeats} interleaved runs.", "",
             "| model | same tokens | generate (s) | lean loop (s) | lean / generate |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['same_tokens']} | {v['generate_s']:.3f} | {v['lean_s']:.3f} "
              f"| {v['lean_over_generate']:.2f} |" for k, v in rows.items()]
    (args.out / "sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
