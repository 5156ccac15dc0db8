"""The ``student`` source: on-policy samples of the student itself (GKD), and with a reward term
(``reward.alpha``) ``reward.group`` samples of each prompt, scored for the policy gradient."""

from __future__ import annotations

import torch

from distill.config import SourcesConfig
from distill.data import Record
from distill.generation import sample
from distill.sources.base import Generated, GeneratingSource, Pairs, Round, Sequences, SourceContext, SourceStats


class OnPolicySource(GeneratingSource):
    name = "student"
    what = "student samples (on-policy, GKD)"

    def models(self, ctx: SourceContext) -> tuple[torch.nn.Module, ...]:
        return (ctx.student,)

    def generation_round(self, cfg: SourcesConfig) -> Round:
        return Round("student samples", ("student",), cfg.student.max_new_tokens)

    def prompts(self, ctx: SourceContext, batch_size: int) -> int:
        return batch_size if ctx.reward is None else batch_size // ctx.reward.group

    def sequences(self, pairs: Pairs, ctx: SourceContext, *, step: int, seed: int, synced: bool = False,
                  records: list[Record] | None = None) -> Sequences:
        term = ctx.reward
        if term is None:
            return super().sequences(pairs, ctx, step=step, seed=seed, synced=synced)
        if records is None:
            raise ValueError("the reward term scores the records the prompts come from; none given")
        # Each prompt's group of samples side by side: the baseline of a sample is its neighbours.
        got = super().sequences([p for p in pairs for _ in range(term.group)], ctx, step=step, seed=seed,
                                synced=synced)
        rewards, got.pg_weights = term.weights([r for r in records for _ in range(term.group)],
                                               [r for _, r in got.pairs])
        got.stats.rewarded = len(rewards)
        got.stats.reward_sum = sum(rewards)
        got.stats.reward_squares = sum(r * r for r in rewards)
        return got

    def generate(self, prompts: list[list[int]], ctx: SourceContext, *, step: int, seed: int,
                 synced: bool) -> Generated:
        s = ctx.cfg.student
        got = sample(ctx.student, prompts, s, pad_id=ctx.pad_id, stops=ctx.stops, seed=seed, vocab=ctx.vocab,
                     synced=synced)
        return Generated(got, s.max_new_tokens, SourceStats(generated=sum(map(len, got))))
