"""The teacher's responses on disk (the ``teacher`` source, SeqKD), reused across runs and recipes.

One JSON file per teacher, dtype, sampling settings, stop tokens and vocabulary, named by a hash
of them all. The teacher is identified by its weights (``distill.fingerprint``). Entries
are keyed by the prompt's token ids, and for sampled (not greedy) responses also by the
generation seed and the whole batch, since a sample depends on both: a sampled batch is reused
whole or regenerated whole. Files are written atomically; a file that does not parse, fails its
checksum or names another teacher or other settings is never used (a warning says so, and it is
rebuilt).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from distill.checkpoint import atomic_write_text
from distill.config import SamplingConfig
from distill.fingerprint import digest as _digest
from distill.fingerprint import weights_fingerprint

FORMAT = 2


def _through_first_stop(response: list[int], stops: list[int]) -> list[int]:
    return next((response[: i + 1] for i, t in enumerate(response) if t in stops), response)


class TeacherCache:
    """Responses of one teacher under one ``SamplingConfig``; ``save()`` writes new entries."""

    def __init__(self, root: str | Path, teacher_dir: str | Path, sampling: SamplingConfig, *, stops: list[int],
                 vocab: int, dtype: str) -> None:
        root = Path(root)
        self.stops = list(stops)
        # Everything a response depends on: the weights (and the dtype they run in), the sampling
        # settings, where a response ends (stop tokens) and which ids may be sampled (vocab).
        self.header = {"format": FORMAT, "teacher": weights_fingerprint(teacher_dir, root), "dtype": dtype,
                       "sampling": dataclasses.asdict(sampling), "stops": self.stops, "vocab": vocab}
        self.path = root / "teacher" / f"{_digest(self.header)[:32]}.json"
        self.greedy = sampling.greedy
        self.entries: dict[str, list[int]] = {}
        self.new: set[str] = set()  # keys stored on this rank since the last take_new
        self.dirty = False
        if self.path.exists():
            self.entries = self._load()

    def _load(self) -> dict[str, list[int]]:
        try:
            data = json.loads(self.path.read_text())
            problem = None
            if {k: data.get(k) for k in self.header} != self.header:
                problem = "it was made by another teacher or with other sampling settings"
            elif data.get("sha256") != _digest(data.get("entries")):
                problem = "its checksum does not match its entries"
        except (OSError, ValueError, AttributeError) as e:
            problem = f"it cannot be read ({type(e).__name__})"
        if problem:
            warnings.warn(f"distill: ignoring the teacher cache {self.path}: {problem}; it will be rebuilt",
                          RuntimeWarning, stacklevel=3)
            self.dirty = True  # overwrite it with what this run generates
            return {}
        return data["entries"]

    def _keys(self, prompts: list[list[int]], seed: int, batch: list[list[int]]) -> list[str]:
        """Each prompt's entry key; a sampled one also names the seed and the batch (hashed once)."""
        context = [] if self.greedy else [seed, _digest(batch)]
        return [_digest([p, *context]) for p in prompts]

    def lookup(self, prompts: list[list[int]], seed: int) -> list[list[int] | None]:
        """The cached response of each prompt of a batch, or None. A sampled batch hits whole or
        not at all (its samples depend on the whole batch and the seed)."""
        found = [self.entries.get(k) for k in self._keys(prompts, seed, prompts)]
        found = [None if r is None else _through_first_stop(r, self.stops) for r in found]
        if not self.greedy and None in found:
            found = [None] * len(prompts)
        return found

    def store(self, prompts: list[list[int]], seed: int, responses: list[list[int]], batch: list[list[int]]) -> None:
        """Keep responses to ``prompts``, generated as part of ``batch`` (the prompts asked for)."""
        for k, r in zip(self._keys(prompts, seed, batch), responses, strict=True):
            self.entries[k] = list(r)
            self.new.add(k)
        self.dirty = True

    def take_new(self) -> dict[str, list[int]]:
        """The entries stored here since the last call (what other ranks' caches lack)."""
        new, self.new = {k: self.entries[k] for k in self.new}, set()
        return new

    def merge(self, entries: dict[str, list[int]]) -> None:
        """Add another cache's entries (another rank's responses of this run)."""
        new = {k: v for k, v in entries.items() if k not in self.entries}
        if new:
            self.entries.update(new)
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({**self.header, "entries": self.entries,
                                                 "sha256": _digest(self.entries)}))
        self.dirty = False
