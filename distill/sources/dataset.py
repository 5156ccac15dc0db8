"""The ``dataset`` source: the dataset's own responses (supervised KD, or SFT with loss.kind=ce)."""

from __future__ import annotations

from distill.sources.base import Pairs, Sequences, Source, SourceContext, SourceStats


class DatasetSource(Source):
    name = "dataset"
    what = "dataset responses (supervised KD / SFT)"
    fixed = True

    def sequences(self, pairs: Pairs, ctx: SourceContext, *, step: int, seed: int, synced: bool = False
                  ) -> Sequences:
        return Sequences(pairs, SourceStats())
