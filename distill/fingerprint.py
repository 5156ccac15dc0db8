"""What identifies a model and a tokenizer across runs: SHA-256 digests that the teacher caches
(``distill.sources.teacher_cache``, ``distill.offline``) key their contents by."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerBase as Tokenizer

from distill.checkpoint import atomic_write_text

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def default_root() -> Path:
    """distill's cache directory: $XDG_CACHE_HOME/distill (~/.cache/distill)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill"


def digest(obj: object) -> str:
    """SHA-256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(model_dir: str | Path, root: Path) -> str:
    """SHA-256 over a model's config and weight files (their names and bytes), memoised under
    ``root`` per file path, size and modification time, so that a large model is read once."""
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


def tokenizer_fingerprint(tokenizer: Tokenizer, template: bool = True) -> str:
    """SHA-256 of what a tokenizer maps text to: its vocabulary, special tokens and (``template``)
    its chat template."""
    what = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens}
    if template:
        what["chat_template"] = getattr(tokenizer, "chat_template", None)
    return digest(what)


def differences(have: dict, want: dict, fields: Iterable[str] | None = None) -> list[str]:
    """The fields (of ``fields``, or all) whose values differ between two keys or identities."""
    names = sorted(set(have) | set(want)) if fields is None else list(fields)
    return [k for k in names if have.get(k) != want.get(k)]


def mismatch(have: dict, want: dict, fields: Iterable[str]) -> str:
    """How ``have`` differs from ``want`` in ``fields``, for one line ("dtype: float32 there,
    bfloat16 here; ..."; digests cut to 12 characters); "" where it does not."""
    def short(value: object) -> str:
        return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)

    return "; ".join(f"{k}: {short(have.get(k))} there, {short(want.get(k))} here"
                     for k in differences(have, want, fields))
