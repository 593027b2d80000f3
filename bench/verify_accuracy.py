"""Accuracy of the verifier on reference solutions.

    python bench/verify_accuracy.py --math500 PATH --gsm8k PATH [--workers 2]

For every problem, its own reference solution is the completion: it must verify as correct
(goal >= 99.5 %). Shifted: solution i against the gold of problem i+1 must not (goal <= 1 %);
a shifted hit is "explained" when the two golds are themselves equal answers. GSM8K is measured
in two forms: "boxed" (worked solution + "The answer is $\\boxed{N}$.", what a model trained for
\\boxed{} writes) and "raw" (the answer field as is, ending in "#### N"; the verifier rewrites the
last "#### N" line to \\boxed{N}). Every miss is listed. Also measured, in this process: how the
gold string is wrapped before parsing (bare / $...$ / \\boxed{}), and the raw GSM8K form with
plain math-verify (no "####" rewrite).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from math_verify import parse, verify  # noqa: E402

from replay.answers import boxed_gsm8k_completion, prepare_completion, split_gsm8k_answer  # noqa: E402
from replay.verify import VerifierPool, verifier_version  # noqa: E402
from replay.verify_worker import extraction_config  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def judge_all(pool: VerifierPool, golds: list[str], completions: list[str]) -> list:
    verdicts = {v.key: v for v in pool.verify_many(zip(range(len(golds)), golds, completions))}
    return [verdicts[i] for i in range(len(golds))]


def evaluate(pool, name: str, ids: list[str], golds: list[str], completions: list[str]) -> float:
    n = len(golds)
    started = time.perf_counter()
    own = judge_all(pool, golds, completions)
    seconds = time.perf_counter() - started
    next_golds = [golds[(i + 1) % n] for i in range(n)]
    shifted = judge_all(pool, next_golds, completions)
    golds_equal = judge_all(pool, next_golds, [f"\\boxed{{{g}}}" for g in golds])
    hits = [i for i in range(n) if shifted[i].correct]
    unexplained = [i for i in hits if not golds_equal[i].correct]
    misses = [i for i in range(n) if not own[i].correct]
    accuracy = 1 - len(misses) / n
    print(f"\n== {name}: {n} problems, {n / seconds:.0f} verdicts/s")
    print(f"own gold      : {accuracy:.2%} correct ({n - len(misses)}/{n}); "
          f"statuses {dict(Counter(v.status for v in own))}")
    print(f"shifted gold  : {len(hits) / n:.2%} verify as correct ({len(hits)}/{n}); "
          f"{len(hits) - len(unexplained)} explained by equal golds, "
          f"{len(unexplained)} unexplained ({len(unexplained) / n:.2%})")
    for i in misses:
        v = own[i]
        print(f"  MISS {ids[i]}: gold={golds[i]!r} extracted={v.extracted_answer!r} "
              f"status={v.status} error={v.error}")
    for i in unexplained:
        print(f"  SHIFTED HIT {ids[i]}: gold={next_golds[i]!r} "
              f"extracted={shifted[i].extracted_answer!r} (own gold {golds[i]!r})")
    return accuracy


def in_process_rate(golds: list[str], completions: list[str], wrap, prepare) -> float:
    """Share verified correct with plain parse/verify calls (gold wrapped by `wrap`)."""
    correct = 0
    for gold, completion in zip(golds, completions):
        parsed_gold = parse(wrap(gold), extraction_config=extraction_config(), parsing_timeout=5)
        answer = parse(prepare(completion), extraction_config=extraction_config(), parsing_timeout=5)
        correct += bool(verify(parsed_gold, answer, timeout_seconds=5))
    return correct / len(golds)


def gold_wrapping_table(golds: list[str], completions: list[str]) -> None:
    print("\n== MATH-500 gold wrapping before parse (in-process, completions prepared as in the pool)")
    wraps = {"bare": lambda g: g, "$...$": lambda g: f"${g}$", "\\boxed{}": lambda g: f"\\boxed{{{g}}}"}
    for label, wrap in wraps.items():
        print(f"  {label:9s}: {in_process_rate(golds, completions, wrap, prepare_completion):.2%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--math500", required=True)
    parser.add_argument("--gsm8k", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="hard backstop per answer (s)")
    args = parser.parse_args(argv)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    print(f"verifier math-verify {verifier_version()}, {args.workers} workers, "
          f"backstop {args.timeout:g}s")

    math_rows = read_jsonl(args.math500)
    gsm_rows = read_jsonl(args.gsm8k)
    m_ids = [r["unique_id"] for r in math_rows]
    m_golds = [r["answer"] for r in math_rows]
    m_solutions = [r["solution"] for r in math_rows]
    g_ids = [f"gsm8k-train-{i}" for i in range(len(gsm_rows))]
    g_golds = [split_gsm8k_answer(r["answer"])[1] for r in gsm_rows]

    results = {}
    with VerifierPool(workers=args.workers, timeout=args.timeout) as pool:
        results["MATH-500"] = evaluate(pool, "MATH-500", m_ids, m_golds, m_solutions)
        results["GSM8K boxed"] = evaluate(
            pool, "GSM8K, boxed form", g_ids, g_golds,
            [boxed_gsm8k_completion(r["answer"]) for r in gsm_rows])
        results["GSM8K raw"] = evaluate(
            pool, "GSM8K, raw form (#### N)", g_ids, g_golds, [r["answer"] for r in gsm_rows])

    gold_wrapping_table(m_golds, m_solutions)
    plain = in_process_rate(g_golds, [r["answer"] for r in gsm_rows],
                            lambda g: f"\\boxed{{{g}}}", lambda text: text)
    print(f"\n== GSM8K raw form with plain math-verify (no '####' rewrite, no window): {plain:.2%}")

    print("\nsummary: " + ", ".join(f"{k} {v:.2%}" for k, v in results.items()))
    return 0 if min(results.values()) >= 0.995 else 1


if __name__ == "__main__":
    sys.exit(main())
