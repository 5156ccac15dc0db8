"""The ``dataset`` source: the dataset's own responses (supervised KD, or SFT with loss.kind=ce)."""

from __future__ import annotations

from distill.data import Record
from distill.sources.base import Pairs, Sequences, Source, SourceContext, SourceStats


class DatasetSource(Source):
    name = "dataset"
    what = "dataset responses (supervised KD / SFT)"
    fixed = True

    def sequences(self, pairs: Pairs, ctx: SourceContext, *, step: int, seed: int, synced: bool = False,
                  records: list[Record] | None = None) -> Sequences:
        return Sequences(pairs, SourceStats())
