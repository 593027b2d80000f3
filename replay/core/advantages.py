"""Group-wise advantages over a flat batch: GRPO, LENS (arXiv 2510.08696 §5), NSR / PSR /
W-REINFORCE (arXiv 2506.01347).

Every function takes 1-D tensors of length N (one entry per sample) plus `group_ids` saying which
prompt-group each sample belongs to; groups may be interleaved in any order. Arithmetic runs in
float64 (these are N-vectors, so it costs nothing) and results come back in the rewards' float
dtype. A sample counts as right when its reward is positive; rewards are meant to be 0/1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import D_IMP_MODES, OBJECTIVES

KIND_NEGATIVE, KIND_MIXED, KIND_POSITIVE = 0, 1, 2
KIND_NAMES = ("negative", "mixed", "positive")
_TINY = 1e-300  # floor for probabilities we divide by (float64)


class Advantages(NamedTuple):
    advantage: torch.Tensor  # [N] before the group weight
    shaped_reward: torch.Tensor  # [N] the reward the advantage was computed from
    weight: torch.Tensor  # [N] loss weight of the sample's group (LENS α for negative groups)
    kind: torch.Tensor  # [N] int64 group kind code, see KIND_NAMES


class _Groups(NamedTuple):
    index: torch.Tensor  # [N] dense group index 0..n_groups-1
    count: torch.Tensor  # [n_groups] float64 group sizes
    n: int


def _groups(group_ids: torch.Tensor) -> _Groups:
    _, index = torch.unique(group_ids, return_inverse=True)
    n = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n, dtype=torch.float64, device=index.device).index_add_(
        0, index, torch.ones_like(index, dtype=torch.float64))
    return _Groups(index, count, n)


def _sum(x: torch.Tensor, g: _Groups) -> torch.Tensor:
    return torch.zeros(g.n, dtype=x.dtype, device=x.device).index_add_(0, g.index, x)


def _max(x: torch.Tensor, g: _Groups) -> torch.Tensor:
    start = torch.full((g.n,), -torch.inf, dtype=x.dtype, device=x.device)
    return start.scatter_reduce_(0, g.index, x, reduce="amax")


def _mean(x: torch.Tensor, g: _Groups) -> torch.Tensor:
    """Per-sample value of its group's mean."""
    return (_sum(x, g) / g.count)[g.index]


def _std(x: torch.Tensor, g: _Groups) -> torch.Tensor:
    """Per-sample value of its group's unbiased std (0 for a group of one)."""
    dev = x - _mean(x, g)
    var = _sum(dev * dev, g) / (g.count - 1).clamp_min(1)
    return var.sqrt()[g.index]


def _check(rewards: torch.Tensor, *others: torch.Tensor | None) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    for t in others:
        if t is not None and t.shape != rewards.shape:
            raise ValueError(f"expected shape {tuple(rewards.shape)}, got {tuple(t.shape)}")


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def sequence_confidence(logprob_sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """c = exp(sum logprob / length), the geometric-mean token probability of each completion.

    A zero-length completion has an empty sum, so we take its mean logprob as 0 and c = 1 (the
    probability of the empty sequence); the `samples` SQL view uses the same convention.
    """
    sums = logprob_sums.to(torch.float64)
    return torch.exp(sums / lengths.to(torch.float64).clamp_min(1)).to(_out_dtype(logprob_sums))


def group_kinds(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample group kind: KIND_NEGATIVE (all wrong), KIND_MIXED, KIND_POSITIVE (all right)."""
    _check(rewards, group_ids)
    g = _groups(group_ids)
    right = _sum((rewards > 0).to(torch.float64), g)[g.index]
    count = g.count[g.index]
    kind = torch.full_like(g.index, KIND_MIXED)
    kind[right == 0] = KIND_NEGATIVE
    kind[right == count] = KIND_POSITIVE
    return kind


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean r)/(std r + eps) within each group, std unbiased; uniform groups give 0."""
    _check(rewards, group_ids)
    g = _groups(group_ids)
    r = rewards.to(torch.float64)
    adv = (r - _mean(r, g)) / (_std(r, g) + eps)
    uniform = _max(r, g)[g.index] == -_max(-r, g)[g.index]
    return torch.where(uniform, 0.0, adv).to(_out_dtype(rewards))


def lens_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, confidence: torch.Tensor,
                    alpha: float = 0.25, d_imp_mode: str = "confidence",
                    sequence_prob: torch.Tensor | None = None, inv_group_size: bool = True,
                    eps: float = 1e-6) -> tuple[Advantages, dict]:
    """LENS: shaped reward r~_i = r_i - (1 - r_i)·(1/G)·c_i/(D - c_i), D a per-group constant.

    negative group: D = 2·max c, A = r~ - mean r~ (no std), weight α.
    mixed group:    D = max(D_imp, 2·max c), A = (r~ - mean)/(std + eps), weight 1, where
                    D_imp = [mean_i r_i/c_i]^-1 ("confidence"), the same with the sequence
                    probability exp(sum logprob) in place of c ("sequence", the paper's letter),
                    or dropped ("off").
    positive group: A = 0, weight 1.
    `inv_group_size=False` drops the 1/G factor. c and D are data, never differentiated.
    """
    if d_imp_mode not in D_IMP_MODES:
        raise ValueError(f"d_imp_mode must be one of {D_IMP_MODES}, got {d_imp_mode!r}")
    if d_imp_mode == "sequence" and sequence_prob is None:
        raise ValueError("d_imp_mode='sequence' needs sequence_prob")
    _check(rewards, group_ids, confidence, sequence_prob)
    g = _groups(group_ids)
    kind = group_kinds(rewards, group_ids)
    r = rewards.to(torch.float64)
    c = confidence.detach().to(torch.float64)
    d = 2 * _max(c, g)
    if d_imp_mode != "off":
        prob = c if d_imp_mode == "confidence" else sequence_prob.detach().to(torch.float64)
        inv = torch.where(r > 0, r / prob.clamp_min(_TINY), 0.0)
        d_imp = g.count / _sum(inv, g)  # inf for negative groups, which ignore it
        mixed_group = torch.zeros(g.n, dtype=torch.bool, device=r.device)
        mixed_group[g.index[kind == KIND_MIXED]] = True
        d = torch.where(mixed_group, torch.maximum(d, d_imp), d)
    d_i = d[g.index]
    # D >= 2c_i, so D - c_i >= c_i and the ratio is in [0, 1]; c_i = 0 (underflow) gives 0, not 0/0
    ratio = torch.where(c > 0, c / (d_i - c), 0.0)
    scale = 1 / g.count[g.index] if inv_group_size else torch.ones_like(r)
    shaped = r - (1 - r) * scale * ratio
    centred = shaped - _mean(shaped, g)
    mixed_adv = centred / (_std(shaped, g) + eps)
    adv = torch.where(kind == KIND_NEGATIVE, centred, torch.where(kind == KIND_MIXED, mixed_adv, 0.0))
    weight = torch.where(kind == KIND_NEGATIVE, float(alpha), 1.0)
    out = _out_dtype(rewards)
    result = Advantages(adv.to(out), shaped.to(out), weight.to(out), kind)
    metrics = {"lens_mean_d_negative": _group_mean_where(d, kind, g, KIND_NEGATIVE),
               "lens_mean_d_mixed": _group_mean_where(d, kind, g, KIND_MIXED)}
    return result, metrics


def _group_mean_where(per_group: torch.Tensor, kind: torch.Tensor, g: _Groups, wanted: int) -> float:
    first = torch.zeros(g.n, dtype=kind.dtype, device=kind.device).scatter_(0, g.index, kind)
    chosen = per_group[first == wanted]
    return float(chosen.mean()) if chosen.numel() else 0.0


def reinforce_advantages(rewards: torch.Tensor, negative: float = -1.0, positive: float = 0.1) -> torch.Tensor:
    """No baseline: A = `negative` for wrong samples, `positive` for right ones.

    NSR is (-1, 0), PSR (0, +1), W-REINFORCE (-1, +λ) with λ = 0.1 in arXiv 2506.01347.
    """
    _check(rewards)
    return torch.where(rewards > 0, float(positive), float(negative)).to(_out_dtype(rewards))


_REINFORCE_DEFAULTS = {"nsr": {"negative": -1.0, "positive": 0.0},
                       "psr": {"negative": 0.0, "positive": 1.0},
                       "w_reinforce": {"negative": -1.0, "positive": 0.1}}


def compute_advantages(objective: str, rewards: torch.Tensor, group_ids: torch.Tensor,
                       confidence: torch.Tensor | None = None, **options) -> tuple[Advantages, dict]:
    """Advantages, shaped rewards, weights and group kinds for one objective, plus metrics.

    options: grpo -> eps; lens -> see lens_advantages; nsr/psr/w_reinforce -> negative, positive.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    _check(rewards, group_ids, confidence)
    out = _out_dtype(rewards)
    metrics: dict = {}
    if objective == "lens":
        if confidence is None:
            raise ValueError("objective 'lens' needs confidence")
        result, metrics = lens_advantages(rewards, group_ids, confidence, **options)
    else:
        if objective == "grpo":
            adv = grpo_advantages(rewards, group_ids, **options)
        else:
            adv = reinforce_advantages(rewards, **(_REINFORCE_DEFAULTS[objective] | options))
        ones = torch.ones_like(rewards, dtype=out)
        result = Advantages(adv, rewards.to(out), ones, group_kinds(rewards, group_ids))
    return result, _summary(result, group_ids) | metrics


def _summary(result: Advantages, group_ids: torch.Tensor) -> dict:
    g = _groups(group_ids)
    n = max(len(result.kind), 1)
    first = torch.zeros(g.n, dtype=result.kind.dtype, device=result.kind.device).scatter_(0, g.index, result.kind)
    n_groups = max(g.n, 1)
    active = (result.advantage != 0) & (result.weight != 0)
    return {"samples": len(result.kind), "groups": g.n,
            "negative_group_share": float((first == KIND_NEGATIVE).sum()) / n_groups,
            "mixed_group_share": float((first == KIND_MIXED).sum()) / n_groups,
            "positive_group_share": float((first == KIND_POSITIVE).sum()) / n_groups,
            "nonzero_adv_share": float(active.sum()) / n,
            "adv_mean": float(result.advantage.double().mean()) if len(result.kind) else 0.0,
            "adv_abs_mean": float(result.advantage.double().abs().mean()) if len(result.kind) else 0.0}


def kind_shares(advantage: torch.Tensor, weight: torch.Tensor, kind: torch.Tensor,
                tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Share of Σ|w·A| that each group kind carries in a set of samples (one optimizer step):
    per sequence for a per-sequence-mean loss, per token when `tokens` (each sample's token count,
    for a token-mean loss) is given. It is the weight each kind has in the step's loss, a cheap
    stand-in for splitting the gradient norm (that would need one backward per kind). All zero
    when nothing in the set has a gradient."""
    mass = (weight.to(torch.float64) * advantage.to(torch.float64)).abs()
    if tokens is not None:
        mass = mass * tokens.to(torch.float64)
    total = float(mass.sum())
    return {name: float(mass[kind == code].sum()) / total if total > 0 else 0.0
            for code, name in enumerate(KIND_NAMES)}
