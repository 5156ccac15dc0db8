"""Training sequences from a source: a micro-batch's prompts become (prompt, response) pairs,
collated by the trainer's one batching path. The response's labels are the generated tokens
through the first stop token; prompt and padding are ignored, so a step's token count (the loss's
denominator) is taken after generation."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distill.config import SourcesConfig
from distill.data import Batch, left_pad
from distill.errors import DistillError
from distill.generation import generating, responses, sample
from distill.sources.skd import skd_generate
from distill.sources.teacher_cache import TeacherCache

Pairs = list[tuple[list[int], list[int]]]


# Above this share of samples that reach max_new_tokens without a stop token, the run warns.
TRUNCATED_WARNING = 0.2


@dataclass
class SourceStats:
    """What generating a step's sequences cost and gave (summed over its micro-batches)."""

    seconds: float = 0.0
    sequences: int = 0
    tokens: int = 0  # response tokens the loss counts
    generated: int = 0  # response tokens generated now (not taken from the teacher cache)
    teacher_forwards: int = 0  # teacher forwards per sequence, summed (SKD's verification rounds)
    teacher_tokens: int = 0  # tokens of the sources whose generation runs the teacher (teacher, skd)
    drafted: int = 0  # SKD: drafts the teacher judged, and accepted
    accepted: int = 0
    cached: int = 0  # teacher responses taken from the cache
    truncated: int = 0  # responses that reached max_new_tokens without a stop token
    clipped: int = 0  # responses cut so that prompt and response fit data.max_length

    def add(self, other: SourceStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def metrics(self) -> dict[str, float]:
        """For the metrics log: generation time, generated tokens/s (cache hits excluded), mean
        response length, the shares of responses ``truncated`` at max_new_tokens and ``clipped``
        at data.max_length, teacher cache hits, and for SKD the acceptance rate and teacher
        forwards per generated token."""
        if not self.sequences:
            return {}
        out = {"gen_seconds": self.seconds, "response_length": self.tokens / self.sequences,
               "gen_truncated": self.truncated / self.sequences, "gen_clipped": self.clipped / self.sequences}
        if self.generated:
            out["gen_tokens_per_s"] = self.generated / max(self.seconds, 1e-9)
        if self.drafted:
            out["skd_acceptance"] = self.accepted / self.drafted
        if self.teacher_tokens:
            out["teacher_forwards_per_token"] = self.teacher_forwards / self.teacher_tokens
        if self.cached:
            out["teacher_cache_hits"] = self.cached / self.sequences
        return out

    def note(self) -> str:
        """The progress bar's summary: generation speed, cache hits shown as hits, SKD acceptance."""
        m, parts = self.metrics(), []
        if "gen_tokens_per_s" in m:
            parts.append(f"gen {m['gen_tokens_per_s']:,.0f} tok/s")
        if self.cached:
            parts.append(f"teacher cache hits {self.cached}/{self.sequences}")
        if "skd_acceptance" in m:
            parts.append(f"SKD accepts {m['skd_acceptance']:.2f}")
        if self.truncated:
            parts.append(f"{m['gen_truncated']:.0%} truncated")
        return ", ".join(parts)

    def problems(self, max_length: int, stops: list[int]) -> dict[str, str]:
        """Warnings about these samples, by kind (the loop prints each kind once per run)."""
        out = {}
        if self.sequences and self.truncated / self.sequences > TRUNCATED_WARNING:
            out["truncated"] = (
                f"{self.truncated} of {self.sequences} samples reached max_new_tokens without a stop token "
                f"(ids {stops}; metric gen_truncated). A model that never stops (length collapse) usually means a "
                "wrong stop token or a base-model student; otherwise raise sources.*.max_new_tokens")
        if self.clipped:
            out["clipped"] = (
                f"{self.clipped} of {self.sequences} samples were cut so that prompt and response fit "
                f"data.max_length={max_length} (metric gen_clipped): the loss sees them cut short; raise "
                "data.max_length or lower sources.*.max_new_tokens")
        return out


def source_pairs(source: str, pairs: Pairs, cfg: SourcesConfig, *, student: PreTrainedModel,
                 teacher: PreTrainedModel | None, skd_k: int, pad_id: int, stops: list[int], max_length: int,
                 vocab: int, seed: int, teacher_cache: TeacherCache | None = None, keep_teacher_hidden: bool = False,
                 synced: bool = False) -> tuple[Pairs, SourceStats, list[torch.Tensor] | None]:
    """``pairs`` (the dataset's micro-batch) as the source ``source`` makes them: unchanged for
    ``dataset``; for the others their prompts with generated responses, cut to ``max_length``
    tokens in all; ``vocab`` is the shared tokenizer's length. ``seed`` fixes the generation (the
    trainer derives it from seed and step). The teacher's responses come from ``teacher_cache``
    where it has them. With ``keep_teacher_hidden`` the SKD and teacher sources also return, per
    pair, the teacher's final hidden states before each response token, from SKD's verification
    forwards or the teacher's decoding steps (None otherwise, also for the teacher source with a
    cache: the loss then runs the teacher itself). ``synced``: the generating model is sharded and
    not gathered, so every rank generates in step (each forward is collective), cached or not."""
    if source == "dataset":
        return pairs, SourceStats(), None
    prompts = [p for p, _ in pairs]
    t0 = time.perf_counter()
    stats = SourceStats(sequences=len(prompts))
    hidden = None
    if source == "student":
        got = sample(student, prompts, cfg.student, pad_id=pad_id, stops=stops, seed=seed, vocab=vocab, synced=synced)
        stats.generated, limit = sum(map(len, got)), cfg.student.max_new_tokens
    elif source == "teacher":
        found = teacher_cache.lookup(prompts, seed) if teacher_cache is not None else [None] * len(prompts)
        missing = [i for i, r in enumerate(found) if r is None]
        if missing or synced:  # synced: a rank whose batch is cached still takes part (one prompt)
            asked = [prompts[i] for i in missing] or prompts[:1]
            # Kept only without a cache: with one, whether a batch was cached would decide how its
            # teacher hidden states were computed (decoding steps or a forward, equal to ~1e-7), and
            # a resumed run would then differ from the uninterrupted one in the last bits.
            hidden = [] if keep_teacher_hidden and teacher_cache is None else None
            new = sample(teacher, asked, cfg.teacher, pad_id=pad_id, stops=stops, seed=seed, vocab=vocab,
                         hidden=hidden, synced=synced)
            if not missing:
                new, hidden = [], None
            if teacher_cache is not None and missing:
                teacher_cache.store(asked, seed, new, prompts)
            for i, r in zip(missing, new, strict=True):
                found[i] = r
            stats.teacher_forwards = stats.generated = sum(map(len, new))  # none for cached responses
        got = found
        stats.cached, limit = len(prompts) - len(missing), cfg.teacher.max_new_tokens
    elif source == "skd":
        if synced:
            raise DistillError("SKD generates with student and teacher gathered whole on every rank, and they do "
                               "not both fit (distill plan); lower sources.weights.skd to 0 or use more ranks")
        s = cfg.skd
        device = next(student.parameters()).device
        ids, mask = (x.to(device) for x in left_pad(prompts, pad_id))
        with generating(student, teacher):
            out = skd_generate(
                student, teacher, ids, attention_mask=mask, k=None if s.top_p is not None else skd_k,
                top_p=s.top_p, gamma=s.gamma, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                teacher_temperature=s.teacher_temperature, teacher_greedy=s.teacher_greedy, eos_token_id=stops,
                pad_token_id=pad_id, generator=torch.Generator(device).manual_seed(seed), vocab=vocab,
                keep_teacher_hidden=keep_teacher_hidden,
            )
        got = responses(out.sequences[:, ids.shape[1]:], stops)
        stats.generated, limit = sum(map(len, got)), s.max_new_tokens
        if keep_teacher_hidden:
            hidden = [h[: len(r)] for h, r in zip(out.target_hidden, got, strict=True)]
        stats.teacher_forwards, stats.drafted, stats.accepted = (
            out.stats.sequence_rounds, out.stats.drafted, out.stats.accepted)
    else:
        raise ValueError(f"unknown source {source!r}")
    stats.seconds = time.perf_counter() - t0
    stats.truncated = sum(len(r) >= limit and r[-1] not in stops for r in got)
    room = [max(max_length - len(p), 1) for p in prompts]
    stats.clipped = sum(len(r) > n for r, n in zip(got, room, strict=True))
    if hidden is not None:
        hidden = [h[:n] for h, n in zip(hidden, room, strict=True)]
    out_pairs = [(p, r[:n]) for p, r, n in zip(prompts, got, room, strict=True)]
    stats.tokens = sum(len(r) for _, r in out_pairs)  # what the loss counts
    if source in ("teacher", "skd"):
        stats.teacher_tokens = sum(map(len, got))
    return out_pairs, stats, hidden


def aligned_hidden(pairs: Pairs, hidden: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Per-response teacher hidden states laid out like ``batch`` (collated ``pairs``) at the
    positions that predict the next token, ``[B, T - 1, H]``: the row of the token before each
    response token; zeros where nothing is counted."""
    out = hidden[0].new_zeros((len(pairs), batch.input_ids.shape[1] - 1, hidden[0].shape[-1]))
    for i, ((p, r), h) in enumerate(zip(pairs, hidden, strict=True)):
        out[i, len(p) - 1: len(p) - 1 + len(r)] = h[: len(r)]
    return out
