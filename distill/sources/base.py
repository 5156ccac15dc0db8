"""What a source is: it turns a micro-batch's prompts into training sequences and statistics.

A source gets the dataset's (prompt, response) pairs and returns pairs the loss trains on: the
dataset's own, or its prompts with generated responses. The response's labels are the generated
tokens through the first stop token; prompt and padding are ignored, so a step's token count (the
loss's denominator) is taken after generation. ``distill.sources`` registers the sources by name.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from distill.config import SourcesConfig
from distill.data import Batch, Record
from distill.rewards import RewardTerm
from distill.sources.teacher_cache import TeacherCache
from distill.teacher import Teacher

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
    rewarded: int = 0  # responses scored by the reward term, their rewards' sum and sum of squares
    reward_sum: float = 0.0
    reward_squares: float = 0.0

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
        if self.rewarded:
            out["reward_mean"] = self.reward_sum / self.rewarded
            out["reward_std"] = max(self.reward_squares / self.rewarded - out["reward_mean"] ** 2, 0.0) ** 0.5
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
        if "reward_mean" in m:
            parts.append(f"reward {m['reward_mean']:.3g}")
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


@dataclass
class SourceContext:
    """What the sources generate with, fixed for a run. ``vocab`` is the shared tokenizer's
    length; ``keep_teacher_hidden``: sources that run the teacher return its final hidden states
    before each response token (for the fused loss: no second teacher forward)."""

    cfg: SourcesConfig
    student: PreTrainedModel
    teacher: Teacher | None
    pad_id: int
    stops: list[int]
    max_length: int
    vocab: int
    total_steps: int = 1  # the run's length, for schedules (SKD's K)
    teacher_cache: TeacherCache | None = None
    keep_teacher_hidden: bool = False
    reward: RewardTerm | None = None  # the policy-gradient term on the student's own samples


@dataclass
class Sequences:
    """A source's answer for one micro-batch: the pairs, what it cost, per pair the teacher's
    hidden states before each response token (None where the loss runs the teacher itself), and
    per pair the policy-gradient weight (alpha times its advantage; None without a reward term)."""

    pairs: Pairs
    stats: SourceStats
    hidden: list[torch.Tensor] | None = None
    pg_weights: list[float] | None = None


@dataclass
class Generated:
    """Responses a source generated (before they are cut to fit data.max_length)."""

    responses: list[list[int]]
    limit: int  # the source's max_new_tokens: a response this long without a stop was truncated
    stats: SourceStats
    hidden: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class Round:
    """A source's generation round, for the plan: which models generate (student, teacher) and
    how many new tokens (positions beyond the prompt) their KV caches hold."""

    what: str
    roles: tuple[str, ...]
    new_tokens: int


class Source(ABC):
    """A source of training sequences: ``name`` is its key in ``sources.weights``, ``what``
    describes it in the plan."""

    name: ClassVar[str]
    what: ClassVar[str]
    needs_teacher: ClassVar[bool] = False  # generates with the teacher (refused without one)
    # Its sequences are the dataset's, known before the run: an offline teacher cache can hold
    # the teacher's view of them (teacher.cache); others need a live teacher.
    fixed: ClassVar[bool] = False

    def models(self, ctx: SourceContext) -> tuple[torch.nn.Module, ...]:
        """The modules it generates with on this rank (gathered whole for a generation round)."""
        return ()

    def generation_round(self, cfg: SourcesConfig) -> Round | None:
        """Its generation round, for the plan's memory (None: it generates nothing)."""
        return None

    def prompts(self, ctx: SourceContext, batch_size: int) -> int:
        """How many of the dataset's prompts make a micro-batch of ``batch_size`` sequences."""
        return batch_size

    @abstractmethod
    def sequences(self, pairs: Pairs, ctx: SourceContext, *, step: int, seed: int, synced: bool = False,
                  records: list[Record] | None = None) -> Sequences:
        """``pairs`` (the dataset's micro-batch, ``records`` what they encode) as this source makes
        them. ``seed`` fixes any generation (derived from the run's seed and step); ``synced``: a
        generating model is sharded and not gathered, so every rank generates in step (each forward
        is collective)."""


class GeneratingSource(Source):
    """A source that answers the dataset's prompts with generated responses: ``generate`` makes
    them; ``sequences`` times it, cuts the responses to fit data.max_length and fills in the
    statistics."""

    runs_teacher: ClassVar[bool] = False  # its responses count as teacher tokens

    @abstractmethod
    def generate(self, prompts: list[list[int]], ctx: SourceContext, *, step: int, seed: int,
                 synced: bool) -> Generated:
        """Responses to ``prompts``, with the statistics only the source knows."""

    def sequences(self, pairs: Pairs, ctx: SourceContext, *, step: int, seed: int, synced: bool = False,
                  records: list[Record] | None = None) -> Sequences:
        prompts = [p for p, _ in pairs]
        t0 = time.perf_counter()
        got = self.generate(prompts, ctx, step=step, seed=seed, synced=synced)
        stats, hidden = got.stats, got.hidden
        stats.sequences = len(prompts)
        stats.seconds = time.perf_counter() - t0
        stats.truncated = sum(len(r) >= got.limit and r[-1] not in ctx.stops for r in got.responses)
        room = [max(ctx.max_length - len(p), 1) for p in prompts]
        stats.clipped = sum(len(r) > n for r, n in zip(got.responses, room, strict=True))
        if hidden is not None:
            hidden = [h[:n] for h, n in zip(hidden, room, strict=True)]
        out = [(p, r[:n]) for p, r, n in zip(prompts, got.responses, room, strict=True)]
        stats.tokens = sum(len(r) for _, r in out)  # what the loss counts
        if self.runs_teacher:
            stats.teacher_tokens = sum(map(len, got.responses))
        return Sequences(out, stats, hidden)


def aligned_hidden(pairs: Pairs, hidden: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """Per-response teacher hidden states laid out like ``batch`` (collated ``pairs``) at the
    positions that predict the next token, ``[B, T - 1, H]``: the row of the token before each
    response token; zeros where nothing is counted."""
    out = hidden[0].new_zeros((len(pairs), batch.input_ids.shape[1] - 1, hidden[0].shape[-1]))
    for i, ((p, r), h) in enumerate(zip(pairs, hidden, strict=True)):
        out[i, len(p) - 1: len(p) - 1 + len(r)] = h[: len(r)]
    return out
