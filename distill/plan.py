"""The memory plan of a run: what each rank will hold, estimated from the model configs alone."""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux's VmHWM; 0 where it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
