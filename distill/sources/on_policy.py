"""The ``student`` source: on-policy samples of the student itself (GKD)."""

from __future__ import annotations

import torch

from distill.config import SourcesConfig
from distill.generation import sample
from distill.sources.base import Generated, GeneratingSource, Round, SourceContext, SourceStats


class OnPolicySource(GeneratingSource):
    name = "student"
    what = "student samples (on-policy, GKD)"

    def models(self, ctx: SourceContext) -> tuple[torch.nn.Module, ...]:
        return (ctx.student,)

    def generation_round(self, cfg: SourcesConfig) -> Round:
        return Round("student samples", ("student",), cfg.student.max_new_tokens)

    def generate(self, prompts: list[list[int]], ctx: SourceContext, *, step: int, seed: int,
                 synced: bool) -> Generated:
        s = ctx.cfg.student
        got = sample(ctx.student, prompts, s, pad_id=ctx.pad_id, stops=ctx.stops, seed=seed, vocab=ctx.vocab,
                     synced=synced)
        return Generated(got, s.max_new_tokens, SourceStats(generated=sum(map(len, got))))
