"""Progress of long stages: a rich bar on a terminal, a plain line at a fixed interval elsewhere.

Without a terminal (a log file, cron, CI, a notebook) rich's live bar prints nothing, so a
35-minute learn would look hung. There a background thread prints one line per interval
(REPLAY_PROGRESS_INTERVAL seconds, default 30) with the stage, done/total, rate and ETA, even
while a single batch takes longer than the interval. REPLAY_QUIET=1 (`--quiet`) turns both off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

QUIET_ENV = "REPLAY_QUIET"
INTERVAL_ENV = "REPLAY_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def interval() -> float:
    """Seconds between plain lines: REPLAY_PROGRESS_INTERVAL within [0.05 s, 1 day], else 30."""
    try:
        seconds = float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL)
    except ValueError:
        return DEFAULT_INTERVAL
    return min(max(seconds, 0.05), 86400.0) if seconds == seconds else DEFAULT_INTERVAL  # NaN: default


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(label: str, unit: str, done: int, total: int, start_done: int, elapsed: float,
                  status: str = "") -> str:
    """One plain progress line; rate and ETA count only the work done by this run."""
    pct = f" ({done / total:.0%})" if total else ""
    parts = [f"[{label}] {done}/{total} {unit}{pct}", f"elapsed {duration(elapsed)}"]
    fresh = done - start_done
    if fresh > 0 and elapsed > 0:
        rate = fresh / elapsed
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{elapsed / fresh:.3g} s/{unit.rstrip('s')}")
        if total > done:
            parts.append(f"ETA {duration((total - done) / rate)}")
    if status:
        parts.append(status)
    return ", ".join(parts)


def note(label: str, text: str) -> None:
    """One line about a slow step that has no count (loading a model, starting an engine)."""
    if not quiet():
        print(f"[{label}] {text}", file=sys.stderr, flush=True)


class _PlainBar:
    """Prints progress_line to `stream` every `every` seconds from a daemon thread, and once at the end."""

    def __init__(self, label: str, total: int, done: int, unit: str, stream, every: float):
        self.label, self.total, self.done, self.unit = label, total, done, unit
        self.start_done, self.status, self.stream, self.every = done, "", stream, every
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"progress {label}", daemon=True)

    def advance(self, n: int, status: str = "") -> None:
        with self._lock:
            self.done += n
            if status:
                self.status = status

    def _print(self, prefix: str = "") -> None:
        with self._lock:
            line = progress_line(self.label, self.unit, self.done, self.total, self.start_done,
                                 time.perf_counter() - self.started, self.status)
        try:
            print(prefix + line, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream never stops the stage
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._print()

    def start(self) -> "_PlainBar":
        self._print()
        self._thread.start()
        return self

    def finish(self, ok: bool, last_line: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if last_line:
            self._print("done " if ok else "stopped ")


class _RichBar:
    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: int, status: str = "") -> None:
        self._progress.update(self._task, advance=n, status=status)


class _Silent:
    def advance(self, n: int, status: str = "") -> None:
        pass


@contextlib.contextmanager
def progress_bar(label: str, total: int, done: int = 0, unit: str = "items") -> Iterator:
    """A bar with .advance(n, status): rich on a terminal, plain lines otherwise, nothing when quiet."""
    stream = sys.stderr
    if quiet():
        yield _Silent()
        return
    if not stream.isatty():
        bar = _PlainBar(label, total, done, unit, stream, interval()).start()
        try:
            yield bar
        except KeyboardInterrupt:  # the command says "interrupted", and nothing else
            bar.finish(ok=False, last_line=False)
            raise
        except BaseException:
            bar.finish(ok=False)
            raise
        bar.finish(ok=True)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total, completed=done, status="")
        yield _RichBar(progress, task)
