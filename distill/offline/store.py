"""The on-disk format of an offline teacher cache (``distill cache-teacher``), and its reader.

A cache directory holds:

- ``key.json``: what the contents depend on (the teacher's weights, tokenizer and chat template,
  the data, ``max_length``, the dtypes, the storage) and the shard size. Written first; a directory
  whose key differs is never appended to or read as another run's cache.
- ``shard_NNNNN.safetensors``: the rows of up to ``shard_examples`` examples. A row is one
  sequence's teacher view at its response positions (the positions that predict a response
  token), one entry per response token:

  - storage ``hidden``: ``hidden`` ``[tokens, H]``, the final hidden states (after the last norm);
  - storage ``top_k``: ``ids`` ``[tokens, k]`` (int32), ``logprobs`` ``[tokens, k]`` and
    ``tail`` ``[tokens]`` (fp32, the log of the mass outside the top k).

  Beside them ``offsets`` (int64 ``[rows + 1]``, each row's first entry), ``keys`` (uint8
  ``[rows, 16]``, each row's sequence key) and ``checks`` (int64 ``[rows]``, a digest of each
  row's bytes, verified whenever the row is read). Each shard is written to a temporary name,
  fsynced and renamed: it is whole or absent.
- ``done.json``: written last, with the shard and row counts; a cache without it is incomplete.

Rows are found by their sequence key, a digest of the token ids and the prompt's length: a
reader needs nothing but the sequences a batch holds, and every rank reads only the rows of its
own batches (shards are memory-mapped; a row's slices are read on demand).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distill.checkpoint import atomic_write_text, current_umask, fsync_dir, fsync_file
from distill.errors import DistillError

FORMAT = 1
KEY, DONE = "key.json", "done.json"
FIELDS = {"hidden": ("hidden",), "top_k": ("ids", "logprobs", "tail")}
INDEX_FIELDS = ("offsets", "keys", "checks")


def row_key(ids: Sequence[int], prompt_length: int) -> bytes:
    """A sequence's key: a 16-byte digest of its token ids and where its response starts."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prompt_length.to_bytes(8, "little"))
    h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return h.digest()


def row_check(tensors: Sequence[torch.Tensor]) -> int:
    """A digest of a row's bytes (every field, in order), as a signed 64-bit integer."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_shard(directory: Path, index: int, keys: list[bytes], rows: list[dict[str, torch.Tensor]]) -> Path:
    """Write shard ``index`` of ``rows`` (each a dict of its fields' tensors, first dimension its
    response tokens) and their ``keys``: to a temporary file, fsynced, then renamed into place."""
    names = list(rows[0])
    lengths = [r[names[0]].shape[0] for r in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    tensors = {n: torch.cat([r[n] for r in rows]).contiguous() for n in names}
    tensors |= {"offsets": offsets,
                "keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 16),
                "checks": torch.tensor([row_check([r[n] for n in names]) for r in rows], dtype=torch.int64)}
    final = directory / shard_name(index)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT)})
    os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes a private file
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(directory)
    return final


def read_key(directory: Path) -> dict | None:
    """The cache's key, or None where the directory holds none yet."""
    path = directory / KEY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DistillError(f"{path}: not a cache key ({e}); the directory is damaged, delete it") from None


def write_done(directory: Path, shards: int, rows: int, entries: int) -> None:
    atomic_write_text(directory / DONE, json.dumps({"shards": shards, "rows": rows, "entries": entries}))


@dataclass
class _Shard:
    path: Path
    handle: object  # safetensors' reader (memory-mapped)
    offsets: list[int]
    checks: list[int]


class CacheReader:
    """Rows of a complete cache directory by sequence key. The index (each shard's keys, offsets
    and checks) is read at open; a row's tensors are read when asked for, and checked."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        key = read_key(self.directory)
        if key is None:
            raise DistillError(f"teacher.cache: {self.directory} is not a teacher cache (no {KEY}); "
                               f"write one with distill cache-teacher teacher.cache={self.directory}")
        self.key = key
        done_path = self.directory / DONE
        if not done_path.is_file():
            written = len(list(self.directory.glob("shard_*.safetensors")))
            raise DistillError(f"teacher.cache: {self.directory} is incomplete ({written} shards written, no {DONE}); "
                               "run distill cache-teacher again with the same settings to finish it")
        done = json.loads(done_path.read_text())
        self.fields = FIELDS[key["storage"]]
        self.shards: list[_Shard] = []
        self.index: dict[bytes, tuple[int, int]] = {}
        for i in range(done["shards"]):
            self._open(i)
        if len(self.index) != done["rows"]:
            raise DistillError(f"teacher.cache: {self.directory} indexes {len(self.index)} rows, "
                               f"{DONE} says {done['rows']}; the directory is damaged, write it again")
        self.rows_read = 0

    def _open(self, i: int) -> None:
        path = self.directory / shard_name(i)
        if not path.is_file():
            raise DistillError(f"teacher.cache: {path} is missing; write the cache again")
        try:
            handle = safe_open(str(path), "pt")
            offsets, keys, checks = (handle.get_tensor(n) for n in INDEX_FIELDS)
            entries = {n: handle.get_slice(n).get_shape()[0] for n in self.fields}
        except (SafetensorError, OSError, KeyError) as e:
            raise DistillError(f"teacher.cache: {path} cannot be read ({e}); write the cache again") from None
        if len(offsets) != len(keys) + 1 or any(n != int(offsets[-1]) for n in entries.values()):
            raise DistillError(f"teacher.cache: {path}: its index does not match its tensors; write the cache again")
        shard = len(self.shards)
        self.shards.append(_Shard(path, handle, offsets.tolist(), checks.tolist()))
        for row, k in enumerate(keys):
            self.index[bytes(k.tolist())] = (shard, row)

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def row(self, key: bytes) -> dict[str, torch.Tensor]:
        """The fields of the row of ``key`` (KeyError where the cache has none); DistillError
        where its bytes fail their check."""
        shard_i, row = self.index[key]
        shard = self.shards[shard_i]
        a, b = shard.offsets[row], shard.offsets[row + 1]
        out = {n: shard.handle.get_slice(n)[a:b] for n in self.fields}
        if row_check([out[n] for n in self.fields]) != shard.checks[row]:
            raise DistillError(f"teacher.cache: {shard.path}: row {row} fails its check (the file is damaged); "
                               "delete the shard and run distill cache-teacher again to rewrite it")
        self.rows_read += 1
        return out
