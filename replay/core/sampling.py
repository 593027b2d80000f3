"""Which distribution a stored behaviour logprob is under, from the row's sampling settings.

The importance ratio π_θ / π_old is exact only when the learner evaluates π_θ on the distribution
π_old was read from. The rule per `logprobs_mode` (DESIGN §4, "The ratio rule"):

    processed  the engine's sampling distribution: temperature T, then top-k, then top-p
               (renormalised over what is kept); T = 0 (greedy) is refused (a point mass)
    raw        the model's plain softmax (T = 1, nothing cut), whatever the row sampled with
    unknown    (imports) the plain softmax when the row records no temperature, top-k or top-p
               (or only neutral ones); refused when it records any other, since the stored
               numbers may or may not include them
    anything else, and any other setting (min-p, penalties, logit bias, ...) that is not at its
    neutral value: refused, naming it; --recompute-old-logprobs then recomputes π_old with the
    learner's own function (`recompute_distribution`), which makes the ratio exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

# settings the learner cannot reproduce, with the value at which they do nothing
NEUTRAL_SETTINGS = {"min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0, "logit_bias": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                    "eta_cutoff": 0.0, "bad_words": None, "allowed_token_ids": None}
RECOMPUTE_HINT = ("pass --recompute-old-logprobs to recompute the behaviour logprobs under the "
                  "learner's distribution")


@dataclass(frozen=True)
class Distribution:
    """softmax(top_p(top_k(logits / temperature))); top_k 0 and top_p 1 cut nothing."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


RAW = Distribution()


class UnreproducibleSampling(ValueError):
    def __init__(self, setting: str, value, why: str):
        self.setting, self.value = setting, value
        super().__init__(f"{setting}={value!r}: {why}")


def _neutral_k(top_k) -> bool:
    return top_k is None or int(top_k) <= 0


def _neutral_p(top_p) -> bool:
    return top_p is None or float(top_p) >= 1.0


def _truncation(top_k, top_p) -> tuple[int, float]:
    if top_p is not None and not 0 < float(top_p) <= 1:
        raise UnreproducibleSampling("top_p", top_p, "outside (0, 1]")
    return (0 if _neutral_k(top_k) else int(top_k)), (1.0 if _neutral_p(top_p) else float(top_p))


def stored_distribution(logprobs_mode: str, temperature=None, top_k=None, top_p=None,
                        **other_settings) -> Distribution:
    """The distribution a row's stored logprobs are under, or UnreproducibleSampling."""
    for name, value in other_settings.items():
        if value is not None and (name not in NEUTRAL_SETTINGS or value != NEUTRAL_SETTINGS[name]):
            raise UnreproducibleSampling(name, value, "the learner cannot reproduce this sampling setting")
    if logprobs_mode == "raw":
        return RAW
    if logprobs_mode == "processed":
        if temperature is None or float(temperature) <= 0:
            raise UnreproducibleSampling("temperature", temperature,
                                         "greedy or unrecorded temperature: no sampling distribution")
        return Distribution(float(temperature), *_truncation(top_k, top_p))
    if logprobs_mode == "unknown":
        recorded = {"temperature": temperature if temperature not in (None, 1.0) else None,
                    "top_k": None if _neutral_k(top_k) else top_k,
                    "top_p": None if _neutral_p(top_p) else top_p}
        for name, value in recorded.items():
            if value is not None:
                raise UnreproducibleSampling(name, value, "logprobs_mode is 'unknown': the stored logprobs "
                                             "may or may not include this setting")
        return RAW
    raise UnreproducibleSampling("logprobs_mode", logprobs_mode, "the learner knows processed, raw and unknown")


def recompute_distribution(temperature=None, top_k=None, top_p=None, **_ignored) -> Distribution:
    """The distribution both π_old and π_θ are evaluated on when π_old is recomputed: the row's
    temperature / top-k / top-p when recorded and valid, the plain softmax otherwise. Settings the
    learner cannot reproduce are left out of both sides, so the ratio stays exact."""
    if temperature is None or float(temperature) <= 0:
        return RAW
    try:
        return Distribution(float(temperature), *_truncation(top_k, top_p))
    except UnreproducibleSampling:
        return Distribution(float(temperature))


def check_settings(temperature=None, top_p=None, top_k=None) -> None:
    """Refuse sampling settings no engine can honour and no learner can read (ValueError naming the
    setting); None is not given. temperature: a finite number >= 0 (0: greedy); top_p: in (0, 1];
    top_k: an integer >= -1 (0 and -1 cut nothing). NaN fails every comparison, so each test is
    written to refuse it: `nan` as a temperature once sampled token 0 with NaN logprobs."""
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be >= 0 and finite (0: greedy), got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise ValueError(f"top_k must be an integer >= -1 (0 and -1: no cut), got {top_k!r}")
