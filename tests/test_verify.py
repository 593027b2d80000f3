"""The verifier: answer-text helpers, the math-verify judge, and VerifierPool's guarantees
(every key back exactly once, pathological inputs end as verdicts within the backstop, dead or
stuck workers replaced), plus accuracy on MATH-500 / GSM8K fixture rows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replay.answers import (
    ANSWER_WINDOW_CHARS,
    answer_window,
    boxed_gsm8k_completion,
    clean_text,
    gold_latex,
    prepare_completion,
    promote_hash_answer,
    split_gsm8k_answer,
)
from replay.verify import VERIFIER_NAME, VerifierPool, verifier_version
from replay.verify_worker import Judge

FIXTURES = Path(__file__).parent / "fixtures"
BACKSTOP = 3.0  # seconds; math-verify's own timeouts (1 s) fire first for interruptible work
REPO = Path(__file__).resolve().parents[1]


def _rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout=BACKSTOP, parse_timeout=1, verify_timeout=1) as p:
        yield p


@pytest.fixture(scope="module")
def judge():
    # in this process; generous timeouts: the first parse pays for lazy imports
    return Judge(parse_timeout=20, verify_timeout=20)


def _run(pool, items):
    verdicts = list(pool.verify_many(items))
    keys = [v.key for v in verdicts]
    assert sorted(keys, key=repr) == sorted((item[0] for item in items), key=repr)
    return {v.key: v for v in verdicts}


NORMAL = [("n1", "18", "So the total is $\\boxed{18}$."), ("n2", "\\frac{14}{3}", "x = 14/3."),
          ("n3", "18", "The answer is \\boxed{17}.")]


def _assert_normal(by_key):
    assert by_key["n1"].correct and by_key["n1"].reward == 1.0 and by_key["n1"].status == "ok"
    assert by_key["n2"].correct and by_key["n2"].extracted_answer == "14/3"
    assert not by_key["n3"].correct and by_key["n3"].status == "ok" and by_key["n3"].reward == 0.0


# ---- pure text helpers ----------------------------------------------------------------------

def test_answer_window_keeps_short_text_and_the_tail_of_long_text():
    assert answer_window("abc \\boxed{1}") == "abc \\boxed{1}"
    long_text = "x" * 10_000 + " the answer is 7"
    assert answer_window(long_text) == long_text[-ANSWER_WINDOW_CHARS:]


def test_answer_window_reaches_back_to_the_last_box():
    text = "a" * 1000 + "so $\\boxed{42}$" + "b" * 9000
    window = answer_window(text)
    assert len(window) == ANSWER_WINDOW_CHARS and window.startswith("a" * 296 + "so $\\boxed{42}$")


def test_clean_text_drops_controls_and_lone_surrogates():
    cleaned = clean_text("a\x00b\x1b[1m\ud800c\n\td\x7f")
    assert cleaned == "ab[1m?c\n\td"
    cleaned.encode("utf-8")  # would raise on a lone surrogate


def test_promote_hash_answer_rewrites_only_the_last_marker_and_never_over_a_box():
    assert promote_hash_answer("2+2=4\n#### 4\n") == "2+2=4\n\\boxed{4}\n"
    assert promote_hash_answer("#### 1\n#### 2") == "#### 1\n\\boxed{2}"
    assert promote_hash_answer("\\boxed{3}\n#### 4") == "\\boxed{3}\n#### 4"
    assert prepare_completion("so x = 14/3. Then 2.5 stays.") == "so x = 14/3  Then 2.5 stays."


def test_gold_latex_boxes_bare_golds_once():
    assert gold_latex(" (3, \\frac{\\pi}{2}) ") == "\\boxed{(3, \\frac{\\pi}{2})}"
    assert gold_latex("$5$") == "\\boxed{5}"
    assert gold_latex("\\boxed{5}") == "\\boxed{5}"
    assert gold_latex("\\$18.90") == "\\boxed{\\$18.90}"


def test_gsm8k_helpers():
    answer = "Half of 48 is 48/2 = <<48/2=24>>24.\n#### 24"
    assert split_gsm8k_answer(answer) == ("Half of 48 is 48/2 = <<48/2=24>>24.", "24")
    assert boxed_gsm8k_completion(answer).endswith("The answer is $\\boxed{24}$.")
    with pytest.raises(ValueError):
        split_gsm8k_answer("no marker")
    with pytest.raises(ValueError):
        split_gsm8k_answer("work\n####  ")


def test_gsm8k_gold_is_parsed_once_the_same_way_for_the_tool_and_the_bench(tmp_path):
    """Thousands commas go (math-verify reads "1,080" as a tuple): datasets and bench share this parse."""
    from replay.datasets import file_prompts

    answer = "12 * 90 = <<12*90=1080>>1,080 cents.\n#### 1,080"
    assert split_gsm8k_answer(answer) == ("12 * 90 = <<12*90=1080>>1,080 cents.", "1080")
    assert boxed_gsm8k_completion(answer).endswith("$\\boxed{1080}$.")
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "How many cents?", "answer": "12 * 90 = 1,080.\\n#### 1,080"}\n')
    assert [p.answer for p in file_prompts(path)] == ["1080"]


# ---- the judge, in this process --------------------------------------------------------------

@pytest.mark.parametrize("gold, completion, correct, status", [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "Polar: $\\boxed{(3, \\frac{\\pi}{2})}$", True, "ok"),
    ("10,\\!080", "The answer is 10080", True, "ok"),
    ("\\$32,\\!348", "She pays $\\boxed{\\$32,348}$.", True, "ok"),
    ("x=5", "\\boxed{5}", True, "ok"),
    ("18", "\\boxed{19}", False, "ok"),
    ("18", "no numbers here", False, "no_answer"),
    ("18", "   ", False, "no_answer"),
    ("", "\\boxed{1}", False, "gold_unparseable"),
    ("\\text{}", "\\boxed{1}", False, "gold_unparseable"),
])
def test_judge_statuses(judge, gold, completion, correct, status):
    got_correct, got_status, _extracted, _error = judge(gold, completion)
    assert (got_correct, got_status) == (correct, status)


def test_judge_passes_gold_first_and_parses_it_once(judge):
    # math-verify is asymmetric: a set answer may match a relation gold, not the other way round
    assert judge("1 < x < 2", "\\boxed{(1,2)}")[:2] == (True, "ok")
    assert judge("(1,2)", "\\boxed{1 < x < 2}")[:2] == (False, "ok")
    assert judge.parsed_gold("(1,2)") is judge.parsed_gold("(1,2)")


# ---- the pool ------------------------------------------------------------------------------

def test_verifier_identity():
    assert VERIFIER_NAME == "math-verify"
    assert verifier_version().split("+")[0].count(".") >= 1


def test_every_key_comes_back_once_with_the_right_verdict(pool):
    # groups of 8 samples sharing a gold travel as batches; 3 of each 8 are wrong
    items = [((i, "k"), str(i // 8), f"Step.\nThe answer is $\\boxed{{{i // 8 + (i % 8 < 3)}}}$.")
             for i in range(200)]
    by_key = _run(pool, items)
    assert [by_key[(i, "k")].correct for i in range(200)] == [i % 8 >= 3 for i in range(200)]
    assert all(v.status == "ok" and v.latency_ms >= 0 for v in by_key.values())


def test_a_gold_parse_timeout_is_not_cached():
    # a timeout may be load, not the gold: the next answer of that gold parses it again
    judge = Judge(parse_timeout=1, verify_timeout=1)
    real_parse, calls = judge._parse, []

    def parse_timing_out_once(text, **options):
        calls.append(text)
        if len(calls) == 1:
            raise judge._timeout("Operation timed out!")
        return real_parse(text, **options)

    judge._parse = parse_timing_out_once
    assert judge.parsed_gold("7") == ([], "gold parse timed out")
    parsed, error = judge.parsed_gold("7")
    assert error is None and parsed and len(calls) == 2
    assert judge.parsed_gold("7")[0] is parsed and len(calls) == 2  # a successful parse is cached
    assert judge("7", "\\boxed{7}")[:2] == (True, "ok")


PATHOLOGICAL = {
    "power tower": ("1", "\\boxed{9^{9^{9^{9}}}}", {"timeout"}),
    "huge polynomial": ("1", "\\boxed{(x+y+z+w)^{300}}", {"timeout", "ok"}),
    "5000 nested braces": ("1", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
                           {"timeout", "error", "no_answer", "ok"}),
    # inside the parsed window: the LaTeX parser is exponential in nesting depth
    "1900 nested braces": ("1", "\\boxed{" + "{" * 1900 + "1" + "}" * 1900 + "}", {"timeout"}),
    "200k characters, no answer": ("7", "lorem ipsum " * 16_667, {"no_answer"}),
    "empty": ("7", "", {"no_answer"}),
    "control characters": ("7", "\x00\x1b[31m\ud800 so \\boxed{8}\x00", {"ok"}),
    "None": ("7", None, {"error"}),
    "bytes": ("7", b"\\boxed{7}", {"error"}),
    "unpicklable object": ("7", lambda: 7, {"error"}),
    "gold not a string": (7, "\\boxed{7}", {"error"}),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_completion_ends_as_a_verdict_and_spares_the_others(pool, name):
    gold, completion, statuses = PATHOLOGICAL[name]
    started = time.monotonic()
    by_key = _run(pool, [NORMAL[0], ("bad", gold, completion), *NORMAL[1:]])
    bad = by_key["bad"]
    assert bad.status in statuses and not bad.correct and bad.reward == 0.0
    assert time.monotonic() - started < 2 * BACKSTOP
    if bad.status == "error":
        assert bad.error
    _assert_normal(by_key)
    _assert_normal(_run(pool, NORMAL))  # the pool still works afterwards


def test_huge_and_dirty_completions_are_judged(pool):
    completion = "We reason at length. " * 10_000 + "Hence $\\boxed{\\frac{1}{2}}$."
    by_key = _run(pool, [("long", "0.5", completion), ("ctl", "8", "\x1b so \\boxed{8}"),
                         ("nul", "12", "\\boxed{1\x002}"), ("sur", "12", "\\boxed{1\ud8002}")])
    assert by_key["long"].correct and by_key["ctl"].correct and by_key["nul"].correct
    assert by_key["sur"].extracted_answer == "1?2" and not by_key["sur"].correct


def test_backstop_kills_a_stuck_worker_and_replaces_it():
    # soft timeouts longer than the backstop: only the SIGKILL can end the power tower
    with VerifierPool(workers=1, timeout=0.5, parse_timeout=30, verify_timeout=30) as pool:
        before = pool.worker_pids()
        by_key = _run(pool, [("tower", "1", "\\boxed{9^{9^{9^{9}}}}"), *NORMAL])
        assert by_key["tower"].status == "timeout" and "backstop" in by_key["tower"].error
        assert 500 <= by_key["tower"].latency_ms < 5000
        _assert_normal(by_key)
        assert pool.worker_pids() != before


def test_worker_killed_from_outside_is_replaced(pool):
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    by_key = _run(pool, NORMAL * 1 + [(f"x{i}", "3", "\\boxed{3}") for i in range(20)])
    _assert_normal(by_key)
    assert all(by_key[f"x{i}"].correct for i in range(20))
    assert victim not in pool.worker_pids()


def test_abandoned_iteration_leaves_the_pool_usable(pool):
    stream = pool.verify_many((i, "1", "\\boxed{1}") for i in range(50))
    next(stream)
    stream.close()
    _assert_normal(_run(pool, NORMAL))


def test_closed_pool_refuses_work():
    pool = VerifierPool(workers=1)
    pool.close()
    with pytest.raises(RuntimeError):
        list(pool.verify_many(NORMAL))


def test_verifier_never_imports_torch():
    # in a fresh interpreter (this one has torch from conftest); workers are checked through
    # their memory maps, where torch's shared libraries would show up
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from replay.verify import VerifierPool\n"
        "with VerifierPool(workers=1) as p:\n"
        "    assert [v.correct for v in p.verify_many([(0, '2', '\\\\boxed{2}')])] == [True]\n"
        "    maps = [Path(f'/proc/{pid}/maps') for pid in p.worker_pids()]\n"
        "    mapped = [m.read_text() if m.exists() else '' for m in maps]\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
        "print(any('/torch/' in text for text in mapped))\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    # no torch anywhere; and the parent does not even load math-verify's sympy
    assert out.stdout.split("\n")[:3] == ["[]", "False", "False"]


# ---- real data -------------------------------------------------------------------------------

def _accuracy(pool, golds, completions):
    n = len(golds)
    own = _run(pool, [(i, golds[i], completions[i]) for i in range(n)])
    shifted = _run(pool, [(i, golds[(i + 1) % n], completions[i]) for i in range(n)])
    # a shifted hit is explained when the two golds are themselves equal answers
    golds_equal = _run(pool, [(i, golds[(i + 1) % n], f"\\boxed{{{golds[i]}}}") for i in range(n)])
    misses = [i for i in range(n) if not own[i].correct]
    unexplained = [i for i in range(n) if shifted[i].correct and not golds_equal[i].correct]
    return 1 - len(misses) / n, misses, unexplained


def test_math500_reference_solutions_verify(pool):
    rows = _rows("math500_sample.jsonl")
    accuracy, misses, unexplained = _accuracy(
        pool, [r["answer"] for r in rows], [r["solution"] for r in rows])
    assert accuracy >= 0.95, [rows[i]["unique_id"] for i in misses]
    assert unexplained == []


@pytest.mark.parametrize("form", ["boxed", "raw"])
def test_gsm8k_reference_solutions_verify(pool, form):
    rows = _rows("gsm8k_sample.jsonl")
    golds = [split_gsm8k_answer(r["answer"])[1] for r in rows]
    make = boxed_gsm8k_completion if form == "boxed" else (lambda answer: answer)
    accuracy, misses, unexplained = _accuracy(pool, golds, [make(r["answer"]) for r in rows])
    assert accuracy >= 0.95, misses
    assert unexplained == []
