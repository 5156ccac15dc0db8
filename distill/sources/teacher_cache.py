"""The teacher's responses on disk (the ``teacher`` source, SeqKD), reused across runs and recipes.

One JSON file per teacher, dtype, sampling settings, stop tokens and vocabulary, named by a hash
of them all. The teacher is identified by its weights: a SHA-256 of its config and weight files
(memoised per file path, size and modification time, so a large teacher is read once). Entries
are keyed by the prompt's token ids, and for sampled (not greedy) responses also by the
generation seed and the whole batch, since a sample depends on both: a sampled batch is reused
whole or regenerated whole. Files are written atomically; a file that does not parse, fails its
checksum or names another teacher or other settings is never used (a warning says so, and it is
rebuilt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path

from distill.checkpoint import atomic_write_text
from distill.config import SamplingConfig

FORMAT = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def teacher_fingerprint(model_dir: str | Path, root: Path) -> str:
    """SHA-256 over the teacher's config and weight files (their names and bytes)."""
    model_dir = Path(model_dir).resolve()
    files = sorted(f for f in model_dir.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name ==
                                                                        "config.json"))
    memo_path = root / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    total, changed = hashlib.sha256(), False
    for f in files:
        st = f.stat()
        key = f"{f}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):  # noqa: B023 - fh is this iteration's
                    h.update(block)
            memo[key], changed = h.hexdigest(), True
        total.update(f"{f.name}:{memo[key]}\n".encode())
    if changed:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, indent=0))
    return total.hexdigest()


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
        self.header = {"format": FORMAT, "teacher": teacher_fingerprint(teacher_dir, root), "dtype": dtype,
                       "sampling": dataclasses.asdict(sampling), "stops": self.stops, "vocab": vocab}
        self.path = root / "teacher" / f"{_digest(self.header)[:32]}.json"
        self.greedy = sampling.greedy
        self.entries: dict[str, list[int]] = {}
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
        self.dirty = True

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
