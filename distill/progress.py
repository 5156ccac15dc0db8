"""The progress display of long work (training, evaluation passes, eval-draft): rich rows with a
count, optional loss and tokens/s, elapsed and remaining time, on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Written to a file or a pipe, rich would wrap every line at 80 columns, mid-phrase.
UNWRAPPED_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    """A rich console that wraps only on a terminal: to a file or a pipe each line goes whole."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED_WIDTH)


console = make_console(stderr=True)


class _StatsColumn(ProgressColumn):
    """A row's loss, tokens/s and a note where it reports them (fields ``loss``, ``tps``, ``note``)."""

    def render(self, task) -> Text:
        parts = []
        if "loss" in task.fields:
            parts.append(f"loss {task.fields['loss']:.4f}")
        if "tps" in task.fields:
            parts.append(f"{task.fields['tps']:,.0f} tok/s")
        if task.fields.get("note"):
            parts.append(task.fields["note"])
        return Text("  ".join(parts))


def progress_display(enabled: bool = True, auto_refresh: bool = True) -> Progress:
    """A display to use as a context manager; ``enabled=False`` shows nothing (logs, tests).
    ``auto_refresh=False`` draws only when a row advances: no drawing thread competing with code
    that is being timed."""
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        _StatsColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
        auto_refresh=auto_refresh,
    )


@contextmanager
def showing(progress: Progress, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A row of ``progress`` for a pass of ``total`` units, removed when the pass ends; yields its
    step callback (``advance(tokens=n)`` also updates the row's tokens/s)."""
    task = progress.add_task(description, total=total)
    tokens = 0

    def advance(tokens_done: int = 0) -> None:
        nonlocal tokens
        tokens += tokens_done
        progress.advance(task)
        if tokens:
            elapsed = progress.tasks[progress.task_ids.index(task)].elapsed or 0.0
            progress.update(task, tps=tokens / max(elapsed, 1e-9))
        if not progress.live.auto_refresh:
            progress.refresh()

    try:
        yield advance
    finally:
        progress.remove_task(task)
