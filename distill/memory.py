"""Memory readings of this process (Linux's /proc/self/status) and how they are printed."""

from __future__ import annotations

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


def fmt(n: int) -> str:
    """Bytes as GiB (from a tenth of one) or MiB."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MiB"
