"""Llama's RMSNorm, y = w · cast(x / sqrt(mean(x²) + eps)), as one autograd Function.

The same steps as transformers' LlamaRMSNorm (normalised in float32, cast back to x's dtype, then
scaled by w), so the same numbers; what changes is how many fresh [tokens, hidden] tensors a call
makes. Left to autograd that is three in the forward pass and about six in the backward; here one
(plus a short-lived square) and three. On a CPU each fresh tensor is page faults and a memory
pass, and the heap holes between them are most of a training step's memory beyond its live
tensors. Kept for backward: x and the per-token 1/rms, as autograd keeps — or, asked to, the
output instead of x (below).
"""

from __future__ import annotations

import torch


def _wide(x: torch.Tensor) -> torch.dtype:  # float32, or float64 for float64 x (Llama's casts it down)
    return torch.promote_types(x.dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, keep_output):
        wide = x.to(_wide(x))
        rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        normed = (wide * rstd).to(x.dtype)
        y = normed.mul_(weight) if torch.result_type(weight, normed) == normed.dtype else weight * normed
        ctx.from_output = keep_output and x.dtype == y.dtype == torch.float32 and not weight.requires_grad
        ctx.save_for_backward(y if ctx.from_output else x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        kept, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        xhat = kept / weight if ctx.from_output else kept.to(_wide(kept)) * rstd
        dtype = kept.dtype  # x's dtype (y's, when kept, is float32 like x)
        grad_w = None
        if need_w:
            grad_w = (grad_y * xhat.to(dtype)).reshape(-1, kept.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if need_x:  # ∂/∂x of x·rstd(x): rstd · (g − x̂ · mean(g · x̂)), g the gradient at x̂
            g = (grad_y * weight).to(dtype).to(_wide(kept))
            dot = (g * xhat).mean(-1, keepdim=True)
            grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(dtype)
        return grad_x, grad_w, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, keep_output: bool = False) -> torch.Tensor:
    """weight · (x / sqrt(mean(x², -1) + eps)) over the last dimension of x, as LlamaRMSNorm.

    keep_output: keep y for backward instead of x (x̂ = y / w), for a float32 x and a frozen
    weight without zeros (the caller vouches for the zeros). A LoRA'd projection after the norm
    keeps y anyway, so x, the residual stream, need not be kept at all."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    return _RMSNorm.apply(x, weight, float(eps), bool(keep_output))
