"""``distill cache-teacher``: run the teacher once over a run's data and keep its view of every
response on disk (``distill.offline.store``), for any number of training runs to read.

The sequences are those a training run with the same config encodes: the train, validation and
test splits (``data.*`` or the built-in tasks), rendered with the chat template the run would use
and cut to ``data.max_length``. Shards already on disk are kept, so a killed run goes on at the
shard where it stopped; a directory written for another teacher, tokenizer, data or storage is
refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.checkpoint import atomic_write_text
from distill.config import DistillConfig, validate
from distill.data import collate, encode_split
from distill.errors import DistillError
from distill.fingerprint import default_root, differences, digest, tokenizer_fingerprint, weights_fingerprint
from distill.models import (
    check_vocab_rows,
    final_hidden,
    fp32_linear,
    lm_head,
    load_model,
    load_tokenizer,
    match_teacher_tokenizer,
    resolve_device,
)
from distill.offline.store import FORMAT, KEY, read_key, row_key, shard_name, write_done, write_shard
from distill.placement import DTYPES
from distill.progress import progress_display, showing
from distill.top_k_loss import bucket_logprobs

SPLITS = ("train", "validation", "test")

Pair = tuple[list[int], list[int]]


@dataclass
class CacheSummary:
    directory: Path
    shards: int
    written: int  # shards written by this call (the rest were on disk already)
    rows: int  # distinct sequences
    entries: int  # response tokens
    bytes: int  # the shards' size on disk

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.entries, 1)


def run_tokenizer(cfg: DistillConfig) -> Tokenizer:
    """The tokenizer a training run of ``cfg`` renders its data with: the student's (or, for a
    student without one, the teacher's), checked against the teacher's, with the run's chat template."""
    path = str(cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path)
    tokenizer = load_tokenizer(path, "student")
    match_teacher_tokenizer(cfg.teacher, tokenizer, path, cfg.data.chat_template)
    return tokenizer


def cache_key(cfg: DistillConfig, tokenizer: Tokenizer, data: dict[str, str]) -> dict:
    """What a cache's contents depend on (``data``: each split's digest)."""
    t = cfg.teacher
    return {"format": FORMAT, "teacher": weights_fingerprint(t.path, default_root()), "teacher_dtype": t.dtype,
            "precision": cfg.trainer.precision, "tokenizer": tokenizer_fingerprint(tokenizer), "vocab": len(tokenizer),
            "data": data, "max_length": cfg.data.max_length, "storage": "top_k" if t.cache_top_k else "hidden",
            "cache_dtype": t.cache_dtype, "top_k": t.cache_top_k, "shard_examples": t.cache_shard_examples}


def encoded_splits(cfg: DistillConfig, tokenizer: Tokenizer) -> dict[str, list[Pair]]:
    """Every split's encoded pairs, as the training run encodes them (a split with no data: empty)."""
    return {split: encode_split(cfg.data, split, tokenizer)[1] for split in SPLITS}


def cache_teacher(cfg: DistillConfig, *, progress: bool = True) -> CacheSummary:
    """Write (or finish) the teacher cache ``cfg.teacher.cache`` for ``cfg``'s data."""
    if not cfg.teacher.cache:
        raise DistillError("cache-teacher: teacher.cache is not set (the directory to write)")
    validate(cfg)  # (a cache needs teacher.path)
    out = Path(cfg.teacher.cache)
    tokenizer = run_tokenizer(cfg)
    vocab = len(tokenizer)
    if cfg.teacher.cache_top_k >= vocab:
        raise DistillError(f"teacher.cache_top_k={cfg.teacher.cache_top_k} must be below the vocabulary ({vocab}); "
                           "use the hidden-state cache (teacher.cache_top_k=0) for the whole distribution")
    splits = encoded_splits(cfg, tokenizer)
    key = cache_key(cfg, tokenizer, {s: digest(p) for s, p in splits.items()})
    out.mkdir(parents=True, exist_ok=True)
    have = read_key(out)
    if have is not None and have != key:
        raise DistillError(f"teacher.cache: {out} holds a cache written with other settings (differing: "
                           f"{', '.join(differences(have, key))}); choose another directory or delete it")
    if have is None:
        atomic_write_text(out / KEY, _json(key))
    for stale in out.glob(".shard_*.tmp-*"):  # a shard a killed run was writing
        stale.unlink()
    rows = _distinct_rows(splits)
    size = cfg.teacher.cache_shard_examples
    shards = [rows[i: i + size] for i in range(0, len(rows), size)]
    todo = [i for i in range(len(shards)) if not (out / shard_name(i)).is_file()]
    if todo:
        device = resolve_device(cfg.trainer.device)
        model = load_model(cfg.teacher, "teacher", device).eval()
        check_vocab_rows(model, tokenizer, f"teacher {cfg.teacher.path}")
        bs = cfg.trainer.eval_batch_size
        total = sum(-(-len(shards[i]) // bs) for i in todo)  # forward batches
        with progress_display(progress) as display, showing(display, "cache-teacher", total) as advance:
            for i in todo:
                keys = [row_key(p + c, len(p)) for p, c in shards[i]]
                write_shard(out, i, keys, _rows(cfg, model, shards[i], tokenizer.pad_token_id, vocab, device,
                                                advance))
    entries = sum(len(c) for _, c in rows)
    write_done(out, len(shards), len(rows), entries)
    size_on_disk = sum((out / shard_name(i)).stat().st_size for i in range(len(shards)))
    return CacheSummary(out, len(shards), len(todo), len(rows), entries, size_on_disk)


def _json(obj: object) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def _distinct_rows(splits: dict[str, list[Pair]]) -> list[Pair]:
    """Every split's pairs in order, each sequence once."""
    seen, rows = set(), []
    for pairs in splits.values():
        for p, c in pairs:
            k = row_key(p + c, len(p))
            if k not in seen:
                seen.add(k)
                rows.append((p, c))
    return rows


@torch.no_grad()
def _rows(cfg: DistillConfig, model: PreTrainedModel, pairs: list[Pair], pad_id: int, vocab: int,
          device: torch.device, advance) -> list[dict[str, torch.Tensor]]:
    """Each pair's row: the teacher's view at its response positions, in the cache's storage.
    Forwards run in batches of ``trainer.eval_batch_size`` sequences of similar length."""
    t = cfg.teacher
    dtype, k = DTYPES[t.cache_dtype], t.cache_top_k
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out: list[dict[str, torch.Tensor] | None] = [None] * len(pairs)
    bs = cfg.trainer.eval_batch_size
    with lm_head(model, vocab) as (w, b):
        for start in range(0, len(order), bs):
            idx = order[start: start + bs]
            batch = collate([pairs[i] for i in idx], pad_id).to(device)
            hidden = final_hidden(model, batch.input_ids, batch.attention_mask, cfg.trainer.precision == "bf16")
            for j, i in enumerate(idx):
                p, c = pairs[i]
                h = hidden[j, len(p) - 1: len(p) - 1 + len(c)]
                if not k:
                    out[i] = {"hidden": h.to(dtype).cpu()}
                    continue
                z = fp32_linear(h, w, b)
                ids = z.topk(k, dim=-1).indices
                buckets = bucket_logprobs(z, ids)  # the top k's log-probabilities, then the tail's
                out[i] = {"ids": ids.to(torch.int32).cpu(), "logprobs": buckets[:, :k].to(dtype).cpu(),
                          "tail": buckets[:, k].float().cpu()}
            advance(int(batch.attention_mask.sum()))
    return out
