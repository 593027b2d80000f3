"""Token-level PPO clipped surrogate against stored behaviour logprobs (verl core_algos style).

Per token t of sequence i, with ρ = exp(logπ_θ - logπ_old) and A_i the sequence's advantage:

    ppo_t  = max(-A·ρ, -A·clip(ρ, 1 - ε, 1 + ε_high))
    loss_t = min(ppo_t, -A·c)   where A < 0 and dual_clip = c (> 1) is set, else ppo_t
    loss_t *= min(sg(ρ), tis_cap)                                  if tis_cap is set
    loss_t *= b_t                                                  (behaviour factor of a replayed row)
    loss_t *= w_i                                                  (per-sequence weight, LENS α)

Rows marked `shaped` (replayed rows with no reproducible behaviour logprobs, LUFFY's policy shaping)
take loss_t = −A·f(π_θ), f(π) = π/(π + γ), instead of the clipped surrogate: no ratio, no clip
(f's gradient f'(π) = γ/(π + γ)² grows for unlikely tokens, which is the point of shaping).

The dual clip bounds what a negative-advantage token can contribute when ρ has grown large, as it
does on data that is stale by whole rounds. The optional truncated importance weight is a
gradient-free per-token factor min(ρ, tis_cap) (ρ detached): it keeps the surrogate's gradient
direction and rescales each token by its importance ratio, truncated at tis_cap.

Aggregation: "seq-mean-token-mean" averages each sequence's tokens, then averages over the
sequences that have at least one token (the per-sequence mean of the GRPO paper, Eq. 3);
"token-mean" sums over all tokens and divides by their number. Masked positions may hold any
value (even inf/NaN): they are replaced before any arithmetic, so their gradient is exactly zero.
"""

from __future__ import annotations

import torch

from . import AGGREGATIONS

# log ρ is clamped to ±20 (verl does the same) so exp never overflows; beyond it the ratio is
# treated as constant (zero gradient), which for every clipped branch is the true gradient anyway
LOG_RATIO_LIMIT = 20.0


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, weights: torch.Tensor | None = None, clip_eps: float = 0.2,
                clip_eps_high: float | None = None, dual_clip: float | None = 3.0,
                tis_cap: float | None = None,
                aggregation: str = "seq-mean-token-mean", token_weights: torch.Tensor | None = None,
                shaped: torch.Tensor | None = None, shaping_gamma: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Scalar loss and metrics for logprobs [B, T] (with grad), old_logprobs [B, T], advantages
    [B], mask [B, T] (1 for completion tokens), weights [B] (default 1), token_weights [B, T]
    (constant behaviour factors, default 1), shaped [B] bool (rows trained by policy shaping).

    Metrics (floats, over real tokens): clip_frac (the clipped branch of the PPO max is active),
    dual_clip_frac, tis_frac (tokens whose weight hit tis_cap), ratio_mean, ratio_max (of the
    clamped ratio), approx_kl (k3 estimate of KL(π_old ‖ π_θ)), tokens.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError("logprobs, old_logprobs and mask must share one [B, T] shape")
    live = mask > 0
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(live, logprobs - old_logprobs.to(logprobs.dtype), zero)
    log_ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)

    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_hit = torch.zeros_like(live)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_hit = (adv < 0) & (per_token > bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, bound), per_token)
    tis_hit = torch.zeros_like(live)
    if tis_cap is not None:
        per_token = per_token * ratio.detach().clamp(max=tis_cap)
        tis_hit = ratio.detach() > tis_cap
    if shaped is not None:
        prob = torch.where(live, logprobs, zero).exp()
        per_token = torch.where(shaped.unsqueeze(1), -adv * prob / (prob + shaping_gamma), per_token)
    if token_weights is not None:
        per_token = per_token * torch.where(live, token_weights.to(logprobs.dtype), zero)
    if weights is not None:
        per_token = per_token * weights.to(logprobs.dtype).unsqueeze(1)
    per_token = torch.where(live, per_token, zero)

    counts = live.sum(dim=1)
    if aggregation == "token-mean":
        loss = per_token.sum() / counts.sum().clamp_min(1)
    else:
        seq_means = per_token.sum(dim=1) / counts.clamp_min(1)
        loss = seq_means.sum() / (counts > 0).sum().clamp_min(1)
    return loss, _metrics(live, ratio.detach(), log_ratio.detach(), clipped > unclipped, dual_hit, tis_hit)


def _metrics(live, ratio, log_ratio, clip_hit, dual_hit, tis_hit) -> dict:
    n = int(live.sum())

    def share(hit: torch.Tensor) -> float:
        return float((hit & live).sum()) / n if n else 0.0

    if n:
        real = ratio[live]
        ratio_mean, ratio_max = float(real.double().mean()), float(real.max())
        approx_kl = float((real.double() - 1 - log_ratio[live].double()).mean())
    else:
        ratio_mean, ratio_max, approx_kl = 1.0, 1.0, 0.0
    return {"clip_frac": share(clip_hit), "dual_clip_frac": share(dual_hit), "tis_frac": share(tis_hit),
            "ratio_mean": ratio_mean, "ratio_max": ratio_max, "approx_kl": approx_kl, "tokens": n}
