"""The ``teacher`` source: the teacher's own samples (SeqKD), reused from the teacher cache
(``distill.sources.teacher_cache``) where it has them."""

from __future__ import annotations

import torch

from distill.config import SourcesConfig
from distill.sources.base import Generated, GeneratingSource, Round, SourceContext, SourceStats


class SeqKDSource(GeneratingSource):
    name = "teacher"
    what = "teacher samples (SeqKD)"
    needs_teacher = True
    runs_teacher = True

    def models(self, ctx: SourceContext) -> tuple[torch.nn.Module, ...]:
        return ctx.teacher.generation_models()

    def generation_round(self, cfg: SourcesConfig) -> Round:
        return Round("teacher samples", ("teacher",), cfg.teacher.max_new_tokens)

    def generate(self, prompts: list[list[int]], ctx: SourceContext, *, step: int, seed: int,
                 synced: bool) -> Generated:
        cache, s = ctx.teacher_cache, ctx.cfg.teacher
        found = cache.lookup(prompts, seed) if cache is not None else [None] * len(prompts)
        missing = [i for i, r in enumerate(found) if r is None]
        stats, hidden = SourceStats(cached=len(prompts) - len(missing)), None
        if missing or synced:  # synced: a rank whose batch is cached still takes part (one prompt)
            asked = [prompts[i] for i in missing] or prompts[:1]
            # Kept only without a cache: with one, whether a batch was cached would decide how its
            # teacher hidden states were computed (decoding steps or a forward, equal to ~1e-7), and
            # a resumed run would then differ from the uninterrupted one in the last bits.
            hidden = [] if ctx.keep_teacher_hidden and cache is None else None
            new = ctx.teacher.generate(asked, s, pad_id=ctx.pad_id, stops=ctx.stops, seed=seed, vocab=ctx.vocab,
                                       hidden=hidden, synced=synced)
            if not missing:
                new, hidden = [], None
            if cache is not None and missing:
                cache.store(asked, seed, new, prompts)
            for i, r in zip(missing, new, strict=True):
                found[i] = r
            stats.teacher_forwards = stats.generated = sum(map(len, new))  # none for cached responses
        return Generated(found, s.max_new_tokens, stats, hidden)
