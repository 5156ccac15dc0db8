"""A teacher read from an offline cache (``distill cache-teacher``): its hidden states (or top-k
log-probabilities) for the sequences the cache holds, and its LM head read alone from
``teacher.path``. The body is never loaded, unless ``teacher.live`` also loads the whole teacher
for what the cache cannot hold (generated sequences)."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.config import DistillConfig, SamplingConfig
from distill.errors import DistillError
from distill.fingerprint import mismatch
from distill.offline.build import Pair, cache_key
from distill.offline.store import CacheReader, row_key
from distill.placement import DTYPES
from distill.progress import console
from distill.speculative import Verifier
from distill.teacher import Head, HeadTeacher, Teacher
from distill.top_k_loss import TopK

# Key fields a training run must share with the cache. The data is checked sequence by sequence
# (``CachedTeacher.check_covers``); the storage is the cache's own.
MATCHED = ("format", "teacher", "teacher_dtype", "precision", "tokenizer", "vocab", "max_length")


class CachedTeacher(HeadTeacher):
    """The teacher of a cache directory; ``live`` (a teacher in this process, or None) serves the
    sequences the cache does not hold, and generation."""

    def __init__(self, reader: CacheReader, weight: torch.Tensor, bias: torch.Tensor | None, config,
                 live: Teacher | None = None, name: str = "teacher") -> None:
        super().__init__(weight, bias, config, name)
        self.reader, self.live = reader, live
        self.storage = reader.key["storage"]

    @property
    def module(self) -> torch.nn.Module | None:
        return None if self.live is None else self.live.module

    def generation_models(self) -> tuple[torch.nn.Module, ...]:
        return () if self.live is None else self.live.generation_models()

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None
              ) -> list[dict[str, torch.Tensor]] | None:
        """The cached rows of the sequences with counted positions, in order (each row's entries
        are its counted positions', checked); None where a sequence is not in the cache and the
        live teacher serves."""
        if positions is None:
            raise ValueError("a cached teacher needs the counted positions to find a sequence's row")
        out = []
        for ids, mask, counted in zip(input_ids.tolist(), attention_mask.tolist(), positions.tolist(), strict=True):
            if not any(counted):
                continue
            start = counted.index(True)
            key = row_key(ids[: sum(mask)], start + 1)
            if key not in self.reader:
                if self.live is not None:
                    return None
                raise DistillError(f"teacher.cache: {self.reader.directory} holds no row for a sequence of this "
                                   "batch (not one of the data it was written for)")
            row = self.reader.row(key)
            n = next(iter(row.values())).shape[0]
            if n != sum(counted) or not all(counted[start: start + n]):
                raise DistillError(f"teacher.cache: {self.reader.directory}: a row of {n} tokens for a sequence with "
                                   f"{sum(counted)} counted; the cache does not match this data")
            out.append(row)
        return out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rows(input_ids, attention_mask, positions) if self.storage == "hidden" else None
        if rows is None:
            return self._live("its hidden states").hidden_states(input_ids, attention_mask, bf16=bf16,
                                                                   positions=positions)
        got = [r["hidden"] for r in rows]
        rows_of = torch.cat(got) if got else torch.zeros((0, self.weight.shape[1]))
        return self.scatter(rows_of, positions.to(input_ids.device))  # rows are in the positions' order

    def top_k(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> TopK | None:
        if self.storage != "top_k":
            return None
        rows = self._rows(input_ids, attention_mask, positions)
        if rows is None:
            return None
        k = self.reader.key["top_k"]
        if not rows:
            return TopK(torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), torch.zeros(0))
        return TopK(torch.cat([r["ids"] for r in rows]).long(), torch.cat([r["logprobs"] for r in rows]).float(),
                    torch.cat([r["tail"] for r in rows]).float()).to(input_ids.device)

    def head(self, vocab: int | None = None) -> AbstractContextManager[Head]:
        return super().head(vocab) if self.live is None else self.live.head(vocab)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bf16: bool = False,
               vocab: int | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.storage != "hidden":
            return self._live("its full logits").logits(input_ids, attention_mask, bf16=bf16, vocab=vocab,
                                                        positions=positions)
        return super().logits(input_ids, attention_mask, bf16=bf16, vocab=vocab, positions=positions)

    def head_problem(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str | None:
        return None if self.live is None else self.live.head_problem(input_ids, attention_mask)

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int, stops: list[int], seed: int,
                 vocab: int | None = None, hidden: list | None = None, synced: bool = False) -> list[list[int]]:
        return self._live("generation").generate(prompts, cfg, pad_id=pad_id, stops=stops, seed=seed, vocab=vocab,
                                                 hidden=hidden, synced=synced)

    def verifier(self) -> Verifier:
        return self._live("SKD's verification").verifier()

    def _live(self, what: str) -> Teacher:
        if self.live is None:
            raise DistillError(f"teacher.cache: {what} needs a live teacher; the cache holds only the teacher's view "
                               "of its data (add teacher.live=true)")
        return self.live

    def check_covers(self, splits: dict[str, list[Pair]]) -> None:
        """Every sequence of ``splits`` must be in the cache, or a live teacher must serve the rest
        (then said once); DistillError naming the split otherwise."""
        for split, pairs in splits.items():
            missing = sum(row_key(p + c, len(p)) not in self.reader for p, c in pairs)
            if not missing:
                continue
            what = f"{missing} of {len(pairs)} {split} sequences are not in teacher.cache={self.reader.directory}"
            if self.live is None:
                raise DistillError(f"{what}: it was written for other data (data.*, data.max_length or the chat "
                                   "template); write one for this data with distill cache-teacher, or add "
                                   "teacher.live=true")
            console.print(f"[yellow]{what}: the live teacher computes them[/yellow]")


def cached_teacher(cfg: DistillConfig, tokenizer: Tokenizer, device: torch.device, live: Teacher | None = None
                   ) -> CachedTeacher:
    """The teacher of ``cfg.teacher.cache``, checked against this run (teacher weights, dtype,
    precision, tokenizer, max_length), with its LM head read from ``teacher.path`` alone."""
    reader = CacheReader(cfg.teacher.cache)
    want = cache_key(cfg, tokenizer, data={})
    if said := mismatch(reader.key, want, MATCHED):
        raise DistillError(f"teacher.cache: {reader.directory} was written for another run ({said}); write one for "
                           "this run with distill cache-teacher")
    if reader.key["storage"] == "top_k" and cfg.loss.temperature != 1.0:
        raise DistillError(f"teacher.cache: {reader.directory} holds top-{reader.key['top_k']} log-probabilities at "
                           f"temperature 1; loss.temperature={cfg.loss.temperature} needs the whole distribution "
                           "(a hidden-state cache: teacher.cache_top_k=0)")
    weight, bias, config = HeadTeacher.head_of(cfg.teacher.path, DTYPES[cfg.teacher.dtype], device, len(tokenizer))
    return CachedTeacher(reader, weight, bias, config, live, name=cfg.teacher.path)

