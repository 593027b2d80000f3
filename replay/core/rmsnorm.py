"""Llama's RMSNorm, y = w · cast(x / sqrt(mean(x²) + eps)), as one autograd Function.

The same steps as transformers' LlamaRMSNorm (normalised in float32, cast back to x's dtype, then
scaled by w), so the same numbers; what changes is how many fresh [tokens, hidden] tensors a call
makes. Left to autograd that is three in the forward pass and about six in the backward; here one
(plus a short-lived square) and three. On a CPU each fresh tensor is page faults and a memory
pass, and the heap holes between them are most of a training step's memory beyond its live
tensors. Kept for backward: x and the per-token 1/rms, as autograd keeps.
"""

from __future__ import annotations

import torch


def _wide(x: torch.Tensor) -> torch.dtype:  # float32, or float64 for float64 x (Llama's casts it down)
    return torch.promote_types(x.dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = x.to(_wide(x))
        rstd = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
        normed = (wide * rstd).to(x.dtype)
        y = normed.mul_(weight) if torch.result_type(weight, normed) == normed.dtype else weight * normed
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        xhat = x.to(_wide(x)) * rstd
        grad_w = None
        if need_w:
            grad_w = (grad_y * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if need_x:  # ∂/∂x of x·rstd(x): rstd · (g − x̂ · mean(g · x̂)), g the gradient at x̂
            g = (grad_y * weight).to(x.dtype).to(_wide(x))
            dot = (g * xhat).mean(-1, keepdim=True)
            grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · (x / sqrt(mean(x², -1) + eps)) over the last dimension of x, as LlamaRMSNorm."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    return _RMSNorm.apply(x, weight, float(eps))
