"""Verification of (gold, completion) pairs with math-verify in worker processes.

Each judgement runs in a worker process (math-verify's SIGALRM timeouts need a process's main
thread). On top of math-verify's own soft timeouts, the parent enforces a hard wall-clock
backstop per answer: a worker that overruns it is SIGKILLed and replaced, and the answer gets
status `timeout`. A worker that dies for another reason is replaced too; its answer is retried
once, then gets status `error`. Every key given to `verify_many` comes back exactly once, as a
Verdict; nothing hangs, nothing raises for bad inputs. Only a window of each completion near its
final answer is parsed (replay.answers.answer_window: the last 4000 characters, reaching back to
the last \\boxed), so a 200 000-character ramble costs no more than a short answer.

Workers are plain processes with our own loop over Pipes (concurrent.futures cannot kill one
stuck worker), started with "forkserver" (fork of a threaded process is unsafe; the fork server
preloads math-verify so a replacement worker starts in milliseconds) or "spawn" where there is
no forkserver. Consecutive items with the same gold (a GRPO group: G samples of one prompt) go
to one worker as one message, up to MAX_BATCH: one gold parse, warm math-verify/sympy caches for
the repeated answers, fewer messages. Each worker has up to `depth` such batches queued so it
never waits on the parent; every answer is still timed on its own.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Iterable, Iterator

from replay import verify_worker
from replay.answers import GOLD_MAX_CHARS, answer_window
from replay.verify_worker import INFLIGHT_BYTES, Job, WorkerHandle

VERIFIER_NAME = "math-verify"
STATUSES = ("ok", "no_answer", "gold_unparseable", "timeout", "error")
MAX_BATCH = 16  # items of one gold per message
STARTUP_TIMEOUT = 120.0  # seconds for a new worker to import math-verify and warm up
_END = object()


def verifier_version() -> str:
    """math-verify's package version + our extraction-config version, e.g. "0.9.0+latex-...v1"."""
    return f"{importlib.metadata.version('math-verify')}+{verify_worker.EXTRACTION_VERSION}"


@dataclass(frozen=True, slots=True)
class Verdict:
    key: Any
    correct: bool
    reward: float
    status: str  # one of STATUSES
    extracted_answer: str  # math-verify's normalised text of the matched answer (0.5 -> \frac{1}{2})
    latency_ms: float  # worker time of this answer; wall time until the kill for a backstop timeout
    error: str | None  # short reason for error / timeout / gold_unparseable


def _verdict(key: Any, correct: bool, status: str, extracted: str = "",
             latency_ms: float = 0.0, error: str | None = None) -> Verdict:
    return Verdict(key, correct, 1.0 if correct else 0.0, status, extracted, latency_ms, error)


def _plain_str(value: Any) -> Any:
    # str subclasses (numpy.str_, ...) would drag their library into the worker's unpickling
    return str(value) if isinstance(value, str) and type(value) is not str else value


def _reject(key: Any, gold: Any, completion: Any) -> Verdict | None:
    """A verdict for inputs that must not reach a worker (wrong types, absurd gold)."""
    if not isinstance(gold, str):
        return _verdict(key, False, "error", error=f"gold is not a string: {type(gold).__name__}")
    if not isinstance(completion, str):
        return _verdict(
            key, False, "error", error=f"completion is not a string: {type(completion).__name__}"
        )
    if len(gold) > GOLD_MAX_CHARS:
        return _verdict(key, False, "gold_unparseable", error=f"gold longer than {GOLD_MAX_CHARS} chars")
    return None


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Takes effect only if this process has not started its fork server yet.
        ctx.set_forkserver_preload(["__main__", "replay.verify_worker", "math_verify"])
        return ctx
    return mp.get_context("spawn")


class VerifierPool:
    """Context manager owning `workers` verifier processes.

    timeout: hard wall-clock seconds per answer (the backstop; the worker is killed past it).
    parse_timeout / verify_timeout: math-verify's own soft timeouts, whole seconds, used inside
    the worker for each parse and each verify call (4 + 4 < 10: for work that Python can
    interrupt they fire first, with no worker to respawn). All are wall-clock: on a heavily
    oversubscribed machine an ordinary answer can overrun them, so leave them generous.
    depth: batches (messages) queued per worker.
    """

    def __init__(self, workers: int = 2, timeout: float = 10.0, parse_timeout: int = 4,
                 verify_timeout: int = 4, depth: int = 2) -> None:
        if workers < 1 or depth < 1 or timeout <= 0:
            raise ValueError("workers and depth must be >= 1 and timeout > 0")
        if parse_timeout < 1 or verify_timeout < 1:
            raise ValueError("math-verify timeouts are whole seconds >= 1")
        self.timeout = float(timeout)
        self.depth = depth
        self._worker_args = (int(parse_timeout), int(verify_timeout))
        self._ctx = _context()
        self._workers = [WorkerHandle(self._ctx, *self._worker_args) for _ in range(workers)]
        self._running = False
        self._closed = False
        self._failed_starts = 0

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for worker in self._workers:
                worker.stop()

    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def verify_many(self, items: Iterable[tuple[Any, Any, Any]]) -> Iterator[Verdict]:
        """Judge (key, gold, completion) items; yields one Verdict per key, in no fixed order.

        gold and completion must be str (anything else gets status "error"); the key is opaque
        and never leaves this process. Items are pulled lazily, so a generator of millions of
        rows is fine; an item that is not a 3-tuple raises ValueError. Not re-entrant: one
        verify_many at a time per pool.
        """
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if self._running:
            raise RuntimeError("VerifierPool.verify_many is already running")
        self._running = True
        try:
            yield from self._run(iter(items))
        finally:
            self._running = False
            if not self._closed:
                # abandoned mid-way: answers still in flight would confuse the next call
                for index, worker in enumerate(self._workers):
                    if worker.jobs:
                        self._replace(index)

    def _run(self, source: Iterator) -> Iterator[Verdict]:
        pending: deque[Job] = deque()  # re-queued jobs first, then items read ahead
        exhausted = False
        seq = 0

        def pull(out: list[Verdict]) -> bool:
            """Move one item from the source to `pending` (or a rejection to `out`)."""
            nonlocal exhausted, seq
            item = _END if exhausted else next(source, _END)
            if item is _END:
                exhausted = True
                return False
            key, gold, completion = item
            gold, completion = _plain_str(gold), _plain_str(completion)
            rejected = _reject(key, gold, completion)
            if rejected is not None:
                out.append(rejected)
            else:
                pending.append(Job(seq, key, gold, answer_window(completion)))
                seq += 1
            return True

        while True:
            out: list[Verdict] = []
            while pending or pull(out):
                if not pending:
                    continue
                # read on while the run of one gold may go on, then cut the batch
                gold = pending[0].gold
                while len(pending) <= MAX_BATCH and pending[-1].gold == gold and pull(out):
                    pass
                batch = [pending.popleft()]
                size = batch[0].nbytes
                while (pending and pending[0].gold == gold and len(batch) < MAX_BATCH
                       and size + pending[0].nbytes <= INFLIGHT_BYTES // 2):
                    size += pending[0].nbytes
                    batch.append(pending.popleft())
                free = [w for w in self._workers if not w.broken and w.has_room(size, self.depth)]
                if not free:
                    pending.extendleft(reversed(batch))
                    break
                min(free, key=lambda w: len(w.jobs)).send(batch)
            busy = [w for w in self._workers if w.jobs or not w.ready]
            if not any(w.jobs for w in busy):
                yield from out
                if exhausted and not pending:
                    return
                continue
            deadline = min(w.head_since + self.timeout if w.ready else w.started_at + STARTUP_TIMEOUT
                           for w in busy)
            waitables = [w.conn for w in busy] + [w.process.sentinel for w in busy]
            ready = set(wait(waitables, timeout=max(0.0, deadline - time.monotonic())))
            for index, worker in enumerate(self._workers):
                for job, (correct, status, extracted, error, latency_ms) in worker.receive():
                    out.append(_verdict(job.key, correct, status, extracted, latency_ms, error))
                exited = worker.broken or worker.process.sentinel in ready
                if not worker.ready:
                    self._check_startup(index, exited, pending)
                    continue
                self._failed_starts = 0
                if worker.jobs:
                    out.extend(self._enforce(index, exited, pending))
            yield from out

    def _enforce(self, index: int, exited: bool, pending: deque[Job]) -> list[Verdict]:
        """Replace a worker that exited or overran the backstop; re-queue its other jobs."""
        worker = self._workers[index]
        elapsed_ms = (time.monotonic() - worker.head_since) * 1000.0
        if exited:
            head, *rest = worker.take_jobs()
            pending.extendleft(reversed(rest))
            self._replace(index)
            head.attempts += 1
            if head.attempts < 2:
                pending.appendleft(head)
                return []
            code = worker.process.exitcode
            return [_verdict(head.key, False, "error", error=f"verifier worker died (exit code {code})")]
        if elapsed_ms > self.timeout * 1000.0:
            head, *rest = worker.take_jobs()
            pending.extendleft(reversed(rest))
            self._replace(index)
            return [_verdict(head.key, False, "timeout", latency_ms=elapsed_ms,
                             error=f"killed after the {self.timeout:g}s wall-clock backstop")]
        return []

    def _check_startup(self, index: int, exited: bool, pending: deque[Job]) -> None:
        """Replace a worker that died or hung while starting; its jobs go back untouched. Three
        failed starts in a row are an installation problem: raise rather than respawn forever."""
        worker = self._workers[index]
        if not exited and time.monotonic() - worker.started_at <= STARTUP_TIMEOUT:
            return
        pending.extendleft(reversed(worker.take_jobs()))
        self._replace(index)
        self._failed_starts += 1
        if self._failed_starts >= 3:
            raise RuntimeError(f"verifier workers fail to start (exit code {worker.process.exitcode});"
                               f" check that `python -c 'import math_verify'` works")

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = WorkerHandle(self._ctx, *self._worker_args)
