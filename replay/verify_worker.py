"""The math-verify calls that judge one (gold, completion) pair, the loop that runs them in a
verifier worker process, and the parent's handle on such a process (replay.verify.VerifierPool
drives the handles).

math-verify's own timeouts use SIGALRM, which only works in the main thread of a process: that is
why every judgement runs in a worker process. Its timeouts are soft (a Python signal handler can
only run between bytecodes); the parent's wall-clock backstop covers the rest.
"""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from replay.answers import (
    ERROR_MAX_CHARS,
    EXTRACTED_MAX_CHARS,
    clean_text,
    clip,
    gold_latex,
    prepare_completion,
)

# Bump whenever extraction_config() or the text handling in replay.answers changes what gets
# extracted.
EXTRACTION_VERSION = "latex-boxed0+expr.gold-boxed.window4000.hash-boxed.numstop.v1"

GOLD_CACHE_SIZE = 4096
READY = "ready"  # a worker's first message: warmed up, the parent may start its answers' clocks
# One of each kind of comparison: each pays 0.03-0.1 s CPU of lazy imports the first time, which
# on a loaded machine would eat into the timeouts of real answers.
WARM_UP = (
    ("\\frac{1}{2}", "so $\\boxed{0.5}$"),
    ("\\frac{3}{7}", "So the answer is 1/14."),
    ("(1,2)", "\\boxed{[1,2]}"),
    ("x^2+1", "\\boxed{x^2-1}"),
    ("\\sqrt{2}", "\\boxed{1.41421}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\boxed{\\begin{pmatrix}1\\\\3\\end{pmatrix}}"),
)

# (correct, status, extracted_answer, error)
Outcome = tuple[bool, str, str, "str | None"]


@functools.cache
def extraction_config() -> tuple:
    """A final \\boxed{} wins over "the answer is ..." phrases and over plain numbers (priority 0
    is tried first); ExprExtractionConfig catches unboxed "... = 42." endings."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _error_text(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}", ERROR_MAX_CHARS)


def _extracted_text(parsed: list) -> str:
    # parse() ends its list with the matched string (fallback_mode="first_match"); str() of a
    # parsed sympy object can itself take very long (think 9^(9^9)), so only that string is shown.
    strings = [p for p in parsed if isinstance(p, str)]
    return clip(strings[-1].strip(), EXTRACTED_MAX_CHARS) if strings else ""


class Judge:
    """parse + verify of (gold, completion) with math-verify; golds parsed once and cached.

    Never raises: every input ends as an Outcome. Timeouts are whole seconds (SIGALRM).
    """

    def __init__(self, parse_timeout: int = 4, verify_timeout: int = 4) -> None:
        if parse_timeout < 1 or verify_timeout < 1:
            raise ValueError("math-verify timeouts are whole seconds >= 1")
        # imported here, not at module level: the parent imports this module for WorkerHandle
        # and must not pay for math-verify + sympy, which only the workers use
        import math_verify
        from math_verify.errors import TimeoutException

        self._parse, self._verify, self._timeout = math_verify.parse, math_verify.verify, TimeoutException
        self._extraction = extraction_config()
        self.parse_timeout = int(parse_timeout)
        self.verify_timeout = int(verify_timeout)
        self._golds: OrderedDict[str, tuple[list, str | None]] = OrderedDict()

    def parsed_gold(self, gold: str) -> tuple[list, str | None]:
        """(parsed gold, None) or ([], reason)."""
        hit = self._golds.get(gold)
        if hit is not None:
            self._golds.move_to_end(gold)
            return hit
        try:
            parsed = self._parse(
                gold_latex(clean_text(gold)),
                extraction_config=self._extraction,
                parsing_timeout=self.parse_timeout,
                raise_on_error=True,
            )
            result = (parsed, None) if parsed else ([], "nothing extractable from the gold")
        except self._timeout:
            return [], "gold parse timed out"  # not cached: it may be load, not the gold
        except Exception as exc:
            result = ([], _error_text(exc))
        self._golds[gold] = result
        if len(self._golds) > GOLD_CACHE_SIZE:
            self._golds.popitem(last=False)
        return result

    def __call__(self, gold: str, completion: str) -> Outcome:
        try:
            return self._judge(gold, completion)
        except self._timeout:
            # the alarm can fire just after math-verify returned, before it disarmed it
            return False, "timeout", "", "math-verify timeout"
        except Exception as exc:  # a verdict, never a crash
            return False, "error", "", _error_text(exc)

    def _judge(self, gold: str, completion: str) -> Outcome:
        gold_parsed, gold_error = self.parsed_gold(gold)
        if gold_error is not None:
            return False, "gold_unparseable", "", gold_error
        text = prepare_completion(completion)
        if not text.strip():
            return False, "no_answer", "", None
        try:
            answer = self._parse(
                text,
                extraction_config=self._extraction,
                parsing_timeout=self.parse_timeout,
                raise_on_error=True,
            )
        except self._timeout:
            return False, "timeout", "", "answer parse timed out"
        except Exception as exc:
            return False, "error", "", _error_text(exc)
        if not answer:
            return False, "no_answer", "", None
        extracted = _extracted_text(answer)
        correct, status, error = self._compare(gold_parsed, answer)
        return correct, status, extracted, error

    def _compare(self, golds: list, answers: list) -> tuple[bool, str, str | None]:
        # verify() pair by pair (gold first: it is asymmetric) so that an exception or timeout
        # on the sympy pair does not hide a match of the plain strings.
        failure: tuple[str, str] | None = None
        for gold in golds:
            for answer in answers:
                try:
                    if self._verify(gold, answer, timeout_seconds=self.verify_timeout, raise_on_error=True):
                        return True, "ok", None
                except self._timeout:
                    failure = ("timeout", "verify timed out")
                except Exception as exc:
                    if failure is None:
                        failure = ("error", _error_text(exc))
        if failure is None:
            return False, "ok", None
        return False, failure[0], failure[1]


def worker_main(conn, parse_timeout: int, verify_timeout: int) -> None:
    """Worker loop: warm up and send READY; then receive a batch [(seq, gold, completion), ...], send one
    (seq, correct, status, extracted, error, latency_ms) per item as soon as it is judged (the
    parent times each answer from the previous result); None or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # timeouts become statuses
    judge = Judge(parse_timeout, verify_timeout)
    for gold, completion in WARM_UP:
        judge(gold, completion)
    try:
        conn.send(READY)
    except (EOFError, OSError):
        return
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for seq, gold, completion in batch:
            started = time.perf_counter()
            correct, status, extracted, error = judge(gold, completion)
            latency_ms = (time.perf_counter() - started) * 1000.0
            try:
                conn.send((seq, correct, status, extracted, error, latency_ms))
            except (EOFError, OSError):
                return


# ---- the parent's handle on one worker process -------------------------------------------------

# Unanswered payload per worker, counted at 4 bytes a character (UTF-8's worst case). It stays
# well below a Linux socket buffer, so conn.send() to a worker that is stuck never blocks the
# parent (which must stay free to enforce the backstop). A batch bigger than this is only sent
# to an idle worker, which is reading.
INFLIGHT_BYTES = 96 * 1024


@dataclass(slots=True)
class Job:
    seq: int
    key: Any
    gold: str
    window: str  # the part of the completion that gets parsed (replay.answers.answer_window)
    attempts: int = 0
    nbytes: int = field(init=False)  # upper bound of its share of a message

    def __post_init__(self) -> None:
        self.nbytes = 4 * (len(self.gold) + len(self.window)) + 64


class WorkerHandle:
    """A worker process, its pipe, and the jobs sent to it and not yet answered (in order)."""

    def __init__(self, ctx, parse_timeout: int, verify_timeout: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, parse_timeout, verify_timeout),
                                   name="replay-verifier", daemon=True)
        self.process.start()
        child.close()
        self.jobs: deque[Job] = deque()  # the head is being judged
        self.batches: deque[int] = deque()  # unanswered jobs per message sent
        self.inflight_bytes = 0
        self.head_since = 0.0  # monotonic time the head job started, as seen from the parent
        self.started_at = time.monotonic()
        self.ready = False  # until its READY: start-up time is nobody's answer time
        self.broken = False

    def has_room(self, batch_bytes: int, depth: int) -> bool:
        return not self.jobs or (
            len(self.batches) < depth and self.inflight_bytes + batch_bytes <= INFLIGHT_BYTES
        )

    def send(self, batch: list[Job]) -> None:
        if not self.jobs and self.ready:
            self.head_since = time.monotonic()
        self.jobs.extend(batch)
        self.batches.append(len(batch))
        self.inflight_bytes += sum(job.nbytes for job in batch)
        try:
            self.conn.send([(job.seq, job.gold, job.window) for job in batch])
        except (OSError, EOFError):
            self.broken = True

    def receive(self) -> list[tuple[Job, tuple]]:
        """Every answer already waiting in the pipe (they come back in send order)."""
        done = []
        try:
            if not self.ready and self.conn.poll():
                if self.conn.recv() != READY:
                    raise EOFError("worker spoke before it was ready")
                self.ready = True
                self.head_since = time.monotonic()
            while self.ready and self.jobs and self.conn.poll():
                _seq, *result = self.conn.recv()
                job = self.jobs.popleft()
                self.inflight_bytes -= job.nbytes
                self.batches[0] -= 1
                if self.batches[0] == 0:
                    self.batches.popleft()
                done.append((job, tuple(result)))
                self.head_since = time.monotonic()
        except (OSError, EOFError):
            self.broken = True
        return done

    def take_jobs(self) -> list[Job]:
        """Forget (and return) every unanswered job: the worker is being replaced."""
        jobs = list(self.jobs)
        self.jobs.clear()
        self.batches.clear()
        self.inflight_bytes = 0
        return jobs

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        if not self.jobs and not self.broken and self.process.is_alive():
            try:
                self.conn.send(None)
            except (OSError, EOFError):
                pass
            self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()
