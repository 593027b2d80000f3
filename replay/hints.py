"""Hints for re-sampling prompts the policy never solves (`generate --prompts SQL --hint KIND`).

Kinds (QuestA, arXiv 2507.13266; Scaf-GRPO, arXiv 2510.19807):
  prefix:F  the first ⌊F·n⌋ lines of the prompt's n-line reference solution (at least 1, at most
            n − 1: never the whole solution), 0 < F < 1
  answer    the final answer stated
  ladder    prefix at F = 0.25, then 0.5, then 0.75, each tier only for the prompts still unsolved

The hint goes into the user turn between the problem and the answer-format instruction, worded
exactly as HINT_PREFIX / HINT_ANSWER say (replay.prompting.user_message).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ReplayError

LADDER = (0.25, 0.5, 0.75)
HINT_PREFIX = "Hint: a correct solution begins like this:\n{lines}"
HINT_ANSWER = "Hint: the final answer is {answer}."
KINDS = "prefix:F (0 < F < 1) | answer | ladder"


@dataclass(frozen=True)
class Hint:
    kind: str  # prefix | answer
    fraction: float | None = None  # prefix's F

    @property
    def slug(self) -> str:
        """The hint set's name in its manifest's stage name: prefix0.5, answer."""
        return "answer" if self.kind == "answer" else f"prefix{self.fraction:g}"


def parse_hint(text: str) -> list[Hint]:
    """The tiers a --hint asks for (one, or the ladder's three), or a one-line error."""
    if text == "answer":
        return [Hint("answer")]
    if text == "ladder":
        return [Hint("prefix", f) for f in LADDER]
    kind, _, value = text.partition(":")
    if kind == "prefix":
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if 0 < fraction < 1:
            return [Hint("prefix", fraction)]
    raise ReplayError(f"unknown --hint {text!r}; use {KINDS}")


def solution_lines(solution: str | None) -> list[str]:
    return [line.strip() for line in (solution or "").splitlines() if line.strip()]


def hint_text(hint: Hint, solution: str | None, answer: str) -> str | None:
    """The hint for one prompt; None when it has nothing to give (no solution, or one line only)."""
    if hint.kind == "answer":
        return HINT_ANSWER.format(answer=answer.strip())
    lines = solution_lines(solution)
    keep = min(len(lines) - 1, max(1, math.floor(hint.fraction * len(lines))))
    return HINT_PREFIX.format(lines="\n".join(lines[:keep])) if keep >= 1 else None
