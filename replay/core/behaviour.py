"""The behaviour correction for replayed rows (decoupled PPO; arXiv 2110.00641, verl's rollout correction).

A replayed row y (a stored success put into a negative group) was sampled by an older policy μ,
not by θ_old, the policy the round starts from. Its PPO ratio stays π_θ/π_θold, and each token
gets a constant (gradient-free) behaviour weight built from

    log w_t = log π_θold(y_t) − log μ(y_t)

with μ the row's own stored logprobs under its own sampling settings:

    tis       factor_t = min(w_t, C)                      (truncated importance sampling)
    seq-mask  factor_t = 1 if exp(mean_t log w_t) ∈ [1/C, C] else 0   (the whole sequence is dropped)
    none      factor_t = 1

`shaping` rows (LUFFY, arXiv 2504.14945) have no reproducible μ: their surrogate is
−A·f(π_θ), f(π) = π/(π + γ), unclipped (replay.core.loss), and their factor is 1.

Torch only; every function takes [B, T] tensors with a mask and returns tensors plus floats.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import BEHAVIOUR_CORRECTIONS

# log w is clamped like the PPO ratio's log (replay.core.loss) so exp never overflows
LOG_WEIGHT_LIMIT = 20.0


class BehaviourWeights(NamedTuple):
    factor: torch.Tensor  # [B, T] the per-token loss factor (0 at masked positions)
    weight: torch.Tensor  # [B, T] w_t before truncation (0 at masked positions)
    sequence_weight: torch.Tensor  # [B] exp(mean_t log w_t): 1 for an empty row
    truncated: torch.Tensor  # [B] tokens whose w_t > C under tis (0 otherwise)
    masked: torch.Tensor  # [B] bool: the sequence was dropped (seq-mask)


def behaviour_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                      mode: str, cap: float = 2.0) -> BehaviourWeights:
    """Per-token behaviour factors of replayed rows: old_logprobs = log π_θold, behaviour_logprobs =
    log μ, mask [B, T] (1 for completion tokens). Masked positions may hold anything (even inf)."""
    if mode not in BEHAVIOUR_CORRECTIONS:
        raise ValueError(f"mode must be one of {BEHAVIOUR_CORRECTIONS}, got {mode!r}")
    if cap <= 1.0:
        raise ValueError(f"cap must be > 1, got {cap}")
    if old_logprobs.shape != behaviour_logprobs.shape or mask.shape != old_logprobs.shape:
        raise ValueError("old_logprobs, behaviour_logprobs and mask must share one [B, T] shape")
    live = mask > 0
    zero = torch.zeros((), dtype=torch.float64, device=old_logprobs.device)
    log_w = torch.where(live, old_logprobs.double() - behaviour_logprobs.double(), zero)
    log_w = log_w.clamp(-LOG_WEIGHT_LIMIT, LOG_WEIGHT_LIMIT)
    weight = torch.where(live, log_w.exp(), zero)
    counts = live.sum(dim=1)
    sequence_weight = (log_w.sum(dim=1) / counts.clamp_min(1)).exp()
    truncated = torch.zeros_like(counts)
    masked = torch.zeros_like(counts, dtype=torch.bool)
    if mode == "tis":
        factor = weight.clamp(max=cap)
        truncated = ((weight > cap) & live).sum(dim=1)
    elif mode == "seq-mask":
        masked = (sequence_weight < 1.0 / cap) | (sequence_weight > cap)
        factor = torch.where(live & ~masked.unsqueeze(1), 1.0, 0.0).double()
    else:  # none, shaping: no factor
        factor = live.double()
    return BehaviourWeights(factor, weight, sequence_weight, truncated, masked)


def replay_metrics(sequence_weight: torch.Tensor, token_weight_sum: float, token_weight_max: float,
                   tokens: int, truncated: int, masked: int, ages: torch.Tensor) -> dict:
    """One step's account of its replayed rows (floats; NULL-able None when there are none):
    replayed_rows, replay_mean_age, behaviour_weight_mean / _max (per token, before truncation),
    behaviour_truncated_share (tokens), behaviour_masked_share (rows), replay_ess (Kish's effective
    sample size of the rows' sequence weights, (Σs)²/Σs², a count between 1 and replayed_rows)."""
    n = int(sequence_weight.numel())
    if n == 0:
        return {"replayed_rows": 0, "replay_mean_age": None, "behaviour_weight_mean": None,
                "behaviour_weight_max": None, "behaviour_truncated_share": None, "behaviour_masked_share": None,
                "replay_ess": None}
    s = sequence_weight.double()
    square = float((s * s).sum())
    return {"replayed_rows": n, "replay_mean_age": float(ages.double().mean()),
            "behaviour_weight_mean": token_weight_sum / tokens if tokens else None,
            "behaviour_weight_max": token_weight_max if tokens else None,
            "behaviour_truncated_share": truncated / tokens if tokens else None,
            "behaviour_masked_share": masked / n,
            "replay_ess": float(s.sum()) ** 2 / square if square > 0 else 0.0}
