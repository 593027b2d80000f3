"""Pure text helpers around answers: what part of a completion gets parsed, how a gold answer
is wrapped before parsing, GSM8K's `#### N` convention, and input cleaning.

No math-verify here; these run in the parent (windowing) and in the verifier workers.
"""

from __future__ import annotations

import re

# Completions can be huge (a 32k-token ramble). math-verify's regexes scan the whole string and
# its boxed pattern is greedy, so only a window near the final answer is parsed:
#   - the last ANSWER_WINDOW_CHARS characters, or, when the last `\boxed` starts before that tail,
#   - ANSWER_WINDOW_CHARS characters starting BOXED_LEAD_CHARS before the last `\boxed`
#     (the lead keeps "$\boxed{a}$ and $\boxed{b}$" answers and the "$" that opens the box).
# Consequence: an answer stated only earlier than the window is not seen (status no_answer).
ANSWER_WINDOW_CHARS = 4000
BOXED_LEAD_CHARS = 300

# A gold answer longer than this is not a math answer; it is rejected as gold_unparseable
# instead of being shipped to a worker.
GOLD_MAX_CHARS = 2000

EXTRACTED_MAX_CHARS = 200
ERROR_MAX_CHARS = 300

# C0 controls (except tab, newline, carriage return), DEL and C1 controls: never part of an
# answer, and NUL / ESC confuse downstream tools (Parquet viewers, terminals).
_CONTROL_CHARS = dict.fromkeys(
    [c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)] + list(range(0x7F, 0xA0))
)
_HASH_ANSWER = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*?)[ \t]*$", re.MULTILINE)
# A full stop right after a digit ("so x = 14/3.") is swallowed by math-verify's plain
# expression pattern, which then reads 14/3.0 (a float) and misses the exact 14/3.
_SENTENCE_FULL_STOP = re.compile(r"(?<=\d)\.(?=\s|$)")


def clean_text(text: str) -> str:
    """Drop control characters; replace lone surrogates (e.g. "\\ud800") with "?".

    Lone surrogates cannot be encoded as UTF-8, so Parquet writers and the LaTeX parser choke.
    """
    if text.isascii():
        return text.translate(_CONTROL_CHARS)
    return text.encode("utf-8", "replace").decode("utf-8").translate(_CONTROL_CHARS)


def answer_window(text: str, max_chars: int = ANSWER_WINDOW_CHARS) -> str:
    """The part of a completion that is parsed for the final answer (see ANSWER_WINDOW_CHARS)."""
    if len(text) <= max_chars:
        return text
    tail_start = len(text) - max_chars
    last_boxed = text.rfind("\\boxed")
    if last_boxed == -1 or last_boxed >= tail_start:
        return text[tail_start:]
    start = max(0, last_boxed - BOXED_LEAD_CHARS)
    return text[start : start + max_chars]


def promote_hash_answer(text: str) -> str:
    """Rewrite the last GSM8K-style `#### N` line as `\\boxed{N}`.

    GSM8K solutions (and models prompted in its format) state the final answer as `#### N`;
    math-verify does not know that marker and would otherwise pick a number after "answer" or
    the last number in the text. A `\\boxed{}` already in the text keeps priority: the rewrite
    only happens when there is none.
    """
    if "####" not in text or "\\boxed" in text:
        return text
    matches = list(_HASH_ANSWER.finditer(text))
    if not matches:
        return text
    last = matches[-1]
    return f"{text[: last.start()]}\\boxed{{{last.group(1)}}}{text[last.end():]}"


def drop_full_stops_after_numbers(text: str) -> str:
    """ "x = 14/3." -> "x = 14/3 "; decimals ("2.5") are untouched (digit after the dot).

    A space, not nothing: "is 12. 500 came" must not become the thousands-grouped "12 500".
    """
    return _SENTENCE_FULL_STOP.sub(" ", text)


def prepare_completion(completion: str) -> str:
    """Everything done to a completion's text before math-verify parses it."""
    text = clean_text(answer_window(completion))
    return drop_full_stops_after_numbers(promote_hash_answer(text))


def gold_latex(gold: str) -> str:
    """Wrap a bare gold answer so math-verify's LaTeX extraction sees the whole of it.

    Bare, "(3, \\frac{\\pi}{2})" is read by the plain-number fallback as "3"; inside \\boxed{}
    every MATH-500 gold parses to the intended object (measured in bench/verify_accuracy.py).
    \\boxed{} rather than $...$ because golds such as "\\$18.90" contain a dollar sign.
    """
    gold = gold.strip()
    if "\\boxed" in gold:
        return gold
    if len(gold) >= 2 and gold[0] == "$" and gold[-1] == "$" and gold.count("$") == 2:
        gold = gold[1:-1].strip()
    return f"\\boxed{{{gold}}}"


def split_gsm8k_answer(answer_field: str) -> tuple[str, str]:
    """GSM8K `answer` field -> (worked solution without the marker line, final answer). The one GSM8K
    parse: datasets reads gold answers with it and the verifier bench measures it. Thousands commas
    go ("1,000" -> "1000"): math-verify would read "1,000" as a tuple."""
    head, sep, final = answer_field.rpartition("####")
    final = final.strip().replace(",", "")
    if not sep or not final:
        raise ValueError("no final '#### N' line (GSM8K format)")
    return head.rstrip(), final


def boxed_gsm8k_completion(answer_field: str) -> str:
    """The worked GSM8K solution ending in "The answer is $\\boxed{N}$." (a typical model output)."""
    solution, final = split_gsm8k_answer(answer_field)
    return f"{solution}\nThe answer is $\\boxed{{{final}}}$."


def clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
