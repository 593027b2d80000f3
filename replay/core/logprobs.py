"""Logprob of the sampled token under the distribution it was drawn from, without ever holding
[N, vocab] logits for all N positions.

The engines sample from   softmax(truncate(final(h·Wᵀ + b) / T))   where `final` is the model's
own last step (Cohere/Granite logit scaling, Gemma-2 final-logit softcapping) and `truncate` keeps
the top-k tokens, then the top-p nucleus of what is left (the order of transformers and vLLM),
setting the rest to -inf. The learner needs that distribution's logprob of each sampled token,
with gradients for h (and W, b when they train).

A plain `log_softmax(hidden @ W.T)` keeps an [N, V] tensor (and autograd its softmax) alive until
backward; with V ≈ 50k and a few thousand positions that is gigabytes. Here a custom autograd
Function walks the positions in chunks: the forward keeps only the per-position logsumexp and the
truncation threshold, and the backward recomputes each chunk's logits to form its gradient. Each
chunk's steps run in place on one [chunk, V] block (two with softcapping; top-k / top-p add their
own while they pick the threshold), and at most one chunk is alive at any time. Logits are formed
in at least float32.

Truncation as a threshold: both cuts keep every token whose score is at least the score of the
last token kept, so the kept set is {s ≥ threshold}. The set is piecewise constant in θ: its
gradient is that of the renormalised softmax over the fixed set. A sampled token outside the set
(possible once θ has moved) has logprob -inf and gradient 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUCLEUS_PROBE = 256  # top-p looks among this many best tokens before sorting the whole vocabulary
BLOCK_BYTES = 64 * 2**20  # one [chunk, V] block: 341 positions of a 49k vocabulary, 110 of a 152k one


def block_rows(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Positions per chunk so that one [chunk, vocab] block of `dtype` stays within BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (vocab * dtype.itemsize))


@dataclass(frozen=True)
class FinalLogits:
    """The model's own map from h·Wᵀ + b to its final logits: z·scale, then cap·tanh(·/cap)."""

    scale: float = 1.0  # Cohere `logit_scale`; Granite 1 / `logits_scaling`
    softcap: float | None = None  # Gemma-2 `final_logit_softcapping`


def truncation_threshold(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                         probe: int = NUCLEUS_PROBE) -> torch.Tensor:
    """[N] smallest kept score per row of scores [N, V] (tempered logits): top-k first (0 = off),
    then top-p (1 = off) over the renormalised survivors; -inf where nothing is cut.

    A token survives top-p iff the mass of the tokens ranked above it is < top_p (the best one
    always survives): the rule of the transformers engine and of vLLM."""
    n, vocab = scores.shape
    threshold = torch.full((n,), float("-inf"), dtype=scores.dtype, device=scores.device)
    k_rows = ((top_k > 0) & (top_k < vocab)).nonzero().squeeze(1)
    if k_rows.numel():
        k = top_k[k_rows].long()
        rows = scores if k_rows.numel() == n else scores[k_rows]  # indexing would copy the block
        best = rows.topk(int(k.max()), dim=-1).values
        threshold[k_rows] = best.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    p_rows = (top_p < 1.0).nonzero().squeeze(1)
    if p_rows.numel():
        sub = scores[p_rows]
        sub = sub.masked_fill(sub < threshold[p_rows].unsqueeze(1), float("-inf"))
        p = top_p[p_rows].to(sub.dtype).unsqueeze(1)
        probs = sub.softmax(-1)
        best, order = probs.topk(min(probe, vocab), dim=-1)  # descending
        if best.shape[-1] < vocab and bool((best.sum(-1, keepdim=True) < p).any()):
            best, order = probs.sort(dim=-1, descending=True)
        keep = (best.cumsum(-1) - best) < p
        keep[:, 0] = True
        last_kept = keep.sum(-1, keepdim=True) - 1  # the kept ranks are a prefix
        threshold[p_rows] = torch.maximum(threshold[p_rows], sub.gather(1, order.gather(1, last_kept)).squeeze(1))
    return threshold


def _final_(raw: torch.Tensor, final: FinalLogits) -> torch.Tensor:
    """final(raw), in place: raw is a fresh [chunk, V] block, and one such block is the memory bound."""
    if final.scale != 1.0:
        raw.mul_(final.scale)
    return raw.div_(final.softcap).tanh_().mul_(final.softcap) if final.softcap else raw


def _logsumexp_(scores: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(scores, -1) (the same steps) without a second [chunk, V] block: scores is
    overwritten. Every row has a finite maximum: truncation keeps at least the best token."""
    top = scores.amax(-1, keepdim=True)
    return scores.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))


class _SampledTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, top_k, top_p, final, chunk_size):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse, threshold = torch.empty_like(out), torch.empty_like(out)
        truncating = bool(((top_k > 0) | (top_p < 1.0)).any())
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            scores = _final_(_chunk_logits(hidden[start:stop], weight, bias, dtype), final)
            scores.div_(temperature[start:stop, None].to(dtype))
            target_score = scores.gather(1, targets[start:stop, None]).squeeze(1)
            if truncating:
                threshold[start:stop] = truncation_threshold(scores, top_k[start:stop], top_p[start:stop])
                scores.masked_fill_(scores < threshold[start:stop, None], float("-inf"))
            else:
                threshold[start:stop] = float("-inf")
            lse[start:stop] = _logsumexp_(scores)
            kept = target_score >= threshold[start:stop]
            out[start:stop] = torch.where(kept, target_score - lse[start:stop], float("-inf"))
            del scores  # before the next chunk's block exists
        ctx.save_for_backward(hidden, weight, bias, targets, temperature, lse, threshold)
        ctx.final, ctx.chunk_size = final, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, temperature, lse, threshold = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, final = lse.dtype, ctx.final
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        weight_wide = weight.to(dtype)  # no copy for float32 weights
        truncated = bool((threshold > float("-inf")).any())
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h, t = hidden[start:stop], temperature[start:stop, None].to(dtype)
            scores = _chunk_logits(h, weight, bias, dtype)
            if final.scale != 1.0:
                scores.mul_(final.scale)
            if final.softcap:  # keep tanh(z/cap) for the derivative 1 - tanh²(z/cap)
                tanh = scores.div_(final.softcap).tanh_()
                scores = tanh * final.softcap
            scores.div_(t)
            if truncated:
                scores.masked_fill_(scores < threshold[start:stop, None], float("-inf"))
            kept = scores.gather(1, targets[start:stop, None]) > float("-inf")
            # d logp[target] / d scores = onehot(target) - softmax over the kept set
            grad = scores.sub_(lse[start:stop, None]).exp_()
            grad.neg_().scatter_add_(1, targets[start:stop, None], torch.ones_like(grad[:, :1]))
            grad.mul_(torch.where(kept, grad_out[start:stop, None].to(dtype), 0.0))  # -inf out: no gradient
            grad.div_(t)
            if final.softcap:
                grad.mul_(tanh.square_().neg_().add_(1))
                del tanh
            if final.scale != 1.0:
                grad.mul_(final.scale)
            if need_h:
                grad_h[start:stop] = (grad @ weight_wide).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.T, h.to(dtype))
            if need_b:
                grad_b += grad.sum(0)
            del scores, grad
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    logits = (hidden @ weight.T).to(dtype)  # a fresh block, which the callers change in place
    return logits if bias is None else logits.add_(bias.to(dtype))


def sampled_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int | None = None, bias: torch.Tensor | None = None,
                           temperature: torch.Tensor | None = None, top_k: torch.Tensor | None = None,
                           top_p: torch.Tensor | None = None,
                           final: FinalLogits = FinalLogits()) -> torch.Tensor:
    """[N] log softmax(truncate(final(hidden @ W^T + bias) / T))[n, targets[n]] for hidden [N, H],
    W [V, H], targets [N]; temperature, top_k (0 = off), top_p (1 = off) per position [N].

    Without temperature/top_k/top_p/final it equals
    `torch.log_softmax(hidden @ W.T + bias, -1).gather(-1, targets[:, None])[:, 0]`, with the same
    gradients for hidden, W and bias; peak extra memory is one [chunk_size, V] block (by default
    as many positions as fit BLOCK_BYTES).
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(lm_head_weight.shape)}")
    n = hidden.shape[0]
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape [{n}], got {tuple(targets.shape)}")
    if chunk_size is None:
        chunk_size = block_rows(lm_head_weight.shape[0], torch.promote_types(hidden.dtype, torch.float32))
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    per_position = {"temperature": (temperature, 1.0, torch.float32), "top_k": (top_k, 0, torch.long),
                    "top_p": (top_p, 1.0, torch.float32)}
    values = []
    for name, (value, neutral, dtype) in per_position.items():
        if value is None:
            value = torch.full((n,), neutral, dtype=dtype, device=hidden.device)
        if value.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(value.shape)}")
        values.append(value.to(device=hidden.device))
    if n and not bool((values[0] > 0).all()):
        raise ValueError("temperature must be > 0 (greedy rows have no distribution to take a ratio against)")
    return _SampledTokenLogprobs.apply(hidden, lm_head_weight, bias, targets.long(), *values, final,
                                       int(chunk_size))
