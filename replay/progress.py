"""One rich progress line per stage: items done of total, rate, and a free-text status."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class _Bar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: int, status: str = "") -> None:
        self._progress.update(self._task, advance=n, status=status)


@contextlib.contextmanager
def progress_bar(label: str, total: int, done: int = 0) -> Iterator[_Bar]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    # a progress line on an interactive terminal; quiet under cron and in CI logs
    with Progress(*columns, console=Console(stderr=True), disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(label, total=total, completed=done, status="")
        yield _Bar(progress, task)
