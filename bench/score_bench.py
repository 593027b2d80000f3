"""Verifier throughput: VerifierPool with N workers vs a single-process loop of the same calls.

    python bench/score_bench.py [--n 10000] [--workers 1 2 3] [--timeout 10]

10 000 synthetic typical model outputs (a few lines of worked arithmetic, then a boxed integer,
a boxed fraction, an unboxed "The answer is ...", a decimal for a fraction, or nothing; about a
third wrong), 8 samples per problem as in a GRPO round. The pool runs with its hard wall-clock
backstop on; the baseline is the same math-verify parse/verify calls (replay.verify_worker.Judge,
math-verify's own timeouts on) in a plain loop in this process: no isolation, no backstop.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections import Counter
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replay.answers import answer_window  # noqa: E402
from replay.verify import VerifierPool, verifier_version  # noqa: E402
from replay.verify_worker import Judge  # noqa: E402

SAMPLES_PER_PROBLEM = 8


def _latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _reasoning(rng: random.Random) -> str:
    lines = []
    for step in range(rng.randint(3, 12)):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op, result = rng.choice([("+", a + b), ("-", a - b), ("\\times", a * b)])
        lines.append(f"Step {step + 1}: we have ${a} {op} {b} = {result}$, so we carry it over.")
    return "\n".join(lines)


def _completion(rng: random.Random, gold: Fraction) -> str:
    shown = gold if rng.random() < 0.65 else gold + rng.choice([-2, -1, 1, 3, Fraction(1, 2)])
    kind = rng.choices(["boxed", "text", "decimal", "none"], weights=[60, 25, 10, 5])[0]
    if kind == "boxed":
        ending = f"Therefore, the final answer is $\\boxed{{{_latex(shown)}}}$."
    elif kind == "text":
        plain = str(shown.numerator) if shown.denominator == 1 else f"{shown.numerator}/{shown.denominator}"
        ending = f"So the answer is {plain}."
    elif kind == "decimal":
        ending = f"The result is approximately $\\boxed{{{float(shown):.6f}}}$."
    else:
        ending = "I am not sure how to finish this problem."
    return f"{_reasoning(rng)}\n{ending}"


def synthetic_items(n: int, seed: int = 0) -> list[tuple[int, str, str]]:
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        gold = Fraction(rng.randint(-50, 5000), rng.choice([1, 1, 1, 2, 3, 4, 7]))
        for _ in range(SAMPLES_PER_PROBLEM):
            items.append((len(items), _latex(gold), _completion(rng, gold)))
    return items[:n]


def _worker_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the worker processes (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _pool_cpu(pool: VerifierPool) -> float:
    return time.process_time() + _worker_cpu_seconds(pool.worker_pids())


def measure(items, args) -> tuple[dict, Counter, dict]:
    """Total (wall s, cpu s) per variant over all items, chunk by chunk, variants interleaved
    (so a neighbour's load burst on a shared machine hits every variant alike)."""
    judge = Judge(args.parse_timeout, args.verify_timeout)
    totals = {name: [0.0, 0.0] for name in ["single", *args.workers]}
    correct: Counter = Counter()
    statuses = {w: Counter() for w in args.workers}
    with ExitStack() as stack:
        pools = {w: stack.enter_context(VerifierPool(
            workers=w, timeout=args.timeout, parse_timeout=args.parse_timeout,
            verify_timeout=args.verify_timeout)) for w in args.workers}
        for pool in pools.values():
            list(pool.verify_many(items[:50]))  # warm up: workers up, imports done
        for _, gold, completion in items[:50]:
            judge(gold, answer_window(completion))
        for start in range(0, len(items), args.chunk):
            chunk = items[start : start + args.chunk]
            wall, cpu = time.perf_counter(), time.process_time()
            correct["single"] += sum(judge(g, answer_window(c))[0] for _, g, c in chunk)
            totals["single"][0] += time.perf_counter() - wall
            totals["single"][1] += time.process_time() - cpu
            for workers, pool in pools.items():
                wall, cpu = time.perf_counter(), _pool_cpu(pool)
                verdicts = list(pool.verify_many(chunk))
                totals[workers][0] += time.perf_counter() - wall
                totals[workers][1] += _pool_cpu(pool) - cpu
                correct[workers] += sum(v.correct for v in verdicts)
                statuses[workers].update(v.status for v in verdicts)
    return totals, correct, statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--chunk", type=int, default=500, help="items per interleaved turn")
    parser.add_argument("--timeout", type=float, default=10.0, help="hard backstop (s)")
    parser.add_argument("--parse-timeout", type=int, default=4)
    parser.add_argument("--verify-timeout", type=int, default=4)
    args = parser.parse_args(argv)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)

    items = synthetic_items(args.n)
    n = len(items)
    mean_chars = sum(len(c) for _, _, c in items) / n
    load = os.getloadavg()[0]
    print(f"math-verify {verifier_version()} | {os.cpu_count()} cores, load average {load:.1f} "
          f"| {n} outputs, mean {mean_chars:.0f} chars, {n // SAMPLES_PER_PROBLEM} distinct golds "
          f"| variants interleaved every {args.chunk} items")
    totals, correct, statuses = measure(items, args)

    base_rate = n / totals["single"][0]
    print(f"single-process loop     : {base_rate:6.0f} verdicts/s, "
          f"{1000 * totals['single'][1] / n:.2f} CPU-ms/verdict ({correct['single']} correct, "
          f"no backstop)")
    for workers in args.workers:
        rate = n / totals[workers][0]
        agree = "same number correct" if correct[workers] == correct["single"] else "MISMATCH"
        print(f"VerifierPool workers={workers}: {rate:6.0f} verdicts/s, "
              f"{1000 * totals[workers][1] / n:.2f} CPU-ms/verdict (parent + workers), "
              f"x{rate / base_rate:.2f} vs single loop; {agree}, statuses {dict(statuses[workers])}")
    top = max(args.workers, key=lambda w: n / totals[w][0])
    print(f"recommended default workers on this machine: {top} "
          f"({n / totals[top][0]:.0f} verdicts/s, x{n / totals[top][0] / base_rate:.2f} vs single loop)"
          f"; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
