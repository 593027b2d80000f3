"""The row contract every generation engine meets (transformers here, vLLM alongside).

No torch import: the contract and its pure helpers are shared by engines with different stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

FinishReason = Literal["stop", "length"]
# "processed": logprob under the distribution the token was drawn from (after temperature /
# top-k / top-p); "raw": under the model's unscaled softmax.
LogprobsMode = Literal["processed", "raw"]
UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample. temperature 0 means greedy (each token then has processed logprob 0)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    max_new_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (not in the text)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1: off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def top_k_cut(self, vocab_size: int) -> int | None:
        """The k to keep, or None when the cut keeps everything."""
        return self.top_k if 0 < self.top_k < vocab_size else None


@dataclass
class Completion:
    """One sampled completion: what a rollout row stores."""

    token_ids: list[int]  # includes the EOS token when the model stopped on it
    logprobs: list[float]  # one per token, see LogprobsMode
    text: str  # decoded without special tokens, cut before a stop string
    finish_reason: FinishReason

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))


class Engine(Protocol):
    name: str
    version: str
    logprobs_mode: LogprobsMode
    lora: str | None

    def generate(self, prompt_token_ids: list[list[int]], seeds: list[int],
                 settings: SamplingSettings) -> list[Completion]:
        """One completion per (prompt, seed) request, in request order. A request's tokens depend
        only on the prompt, its seed and the settings, never on the other requests."""
        ...


def check_requests(prompt_token_ids: Sequence[Sequence[int]], seeds: Sequence[int]) -> None:
    if len(prompt_token_ids) != len(seeds):
        raise ValueError(f"{len(prompt_token_ids)} prompts but {len(seeds)} seeds: one seed per request")
    for i, prompt in enumerate(prompt_token_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")


def generator_seed(seed: int) -> int:
    """Seeds are any Python int (hash-derived ones are large); RNGs take 64 bits."""
    return int(seed) & UINT64


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    at = find_stop(text, stops)
    return text if at is None else text[:at]
