"""Memory readings of this process (Linux's /proc/self/status) and how they are printed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

GIB = 1 << 30


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux's VmHWM; 0 where it cannot be read)."""
    return _status_field("VmHWM")


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    return _status_field("VmRSS")


def _status_field(name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_freed() -> None:
    """Hand the memory this process freed back to the system (glibc's ``malloc_trim``). glibc keeps
    freed heap pages by default, so after an evaluation (KV caches, sampling logits) the process
    would stay as large as it was, and training would add its own on top. A no-op without glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def fmt(n: int) -> str:
    """Bytes as GiB (from a tenth of one) or MiB."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"
