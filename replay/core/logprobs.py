"""Logprob of the sampled token without ever holding [N, vocab] logits for all N positions.

The learner only needs log softmax(h W^T + b)[target] per completion position. A plain
`log_softmax(hidden @ W.T)` keeps an [N, V] tensor (and autograd keeps its softmax) alive until
backward; with V ≈ 50k and a few thousand positions that is gigabytes. Here a custom autograd
Function walks the positions in chunks: the forward keeps only the per-position logsumexp, and the
backward recomputes each chunk's logits to form its gradient, so at most one [chunk, V] block
(plus its softmax) exists at any time. Logits are formed in at least float32.
"""

from __future__ import annotations

import torch


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    logits = (hidden @ weight.T).to(dtype)
    return logits if bias is None else logits + bias.to(dtype)


class _SampledTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits = _chunk_logits(hidden[start:stop], weight, bias, dtype)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse[start:stop]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        weight_wide = weight.to(dtype)  # no copy for float32 weights
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h = hidden[start:stop]
            # d logp[target] / d logits = onehot(target) - softmax(logits), scaled by the incoming grad
            grad_logits = torch.exp(_chunk_logits(h, weight, bias, dtype) - lse[start:stop, None])
            grad_logits.neg_().scatter_add_(1, targets[start:stop, None],
                                            torch.ones_like(grad_logits[:, :1]))
            grad_logits.mul_(grad_out[start:stop, None].to(dtype))
            if need_h:
                grad_h[start:stop] = (grad_logits @ weight_wide).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad_logits.T, h.to(dtype))
            if need_b:
                grad_b += grad_logits.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None


def sampled_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int = 1024, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[N] log softmax(hidden @ W^T + bias)[n, targets[n]] for hidden [N, H], W [V, H], targets [N].

    Equal to `torch.log_softmax(hidden @ W.T, -1).gather(-1, targets[:, None])[:, 0]` with the
    same gradients for hidden, W and bias; peak extra memory is one [chunk_size, V] block.
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(lm_head_weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    return _SampledTokenLogprobs.apply(hidden, lm_head_weight, bias, targets.long(), int(chunk_size))
