"""The SwiGLU MLP's second half, down_proj(silu(g) * u), with a LoRA on down_proj, as one autograd
Function that keeps only g and u for the backward pass.

Left to autograd, the four [tokens, intermediate] tensors g, silu(g), u and h = silu(g)·u all stay
alive until the backward pass (silu's backward keeps g, the product keeps silu(g) and u, the LoRA's
A-projection keeps h): in a Llama-shaped model that is 60 % of a layer's saved activations. Here the
forward keeps g, u and the rank-r h·Aᵀ; the backward recomputes silu(g) and h (elementwise, cheap
next to the matmuls around them). The result and the gradients are those of

    y = h·Wᵀ + b + (h·Aᵀ)·Bᵀ · scaling,      h = silu(g) · u

with the LoRA term in A's dtype (peft's rule: a bf16 base with a float32 LoRA adds in float32 and
casts the sum back to the base's dtype).
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear, silu

from replay.core.lora import add_lora_, base_param_grads, lora_input_grad, lora_param_grads, lora_shapes_fit


class _SwigluLoraDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight, bias, lora_a, lora_b, scaling):
        h = silu(g).mul_(u)
        xa = linear(h.to(lora_a.dtype), lora_a)
        out = add_lora_(linear(h, weight, bias), xa, lora_b, scaling)
        ctx.save_for_backward(g, u, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g, u, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_g, need_u, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        sig = torch.sigmoid(g)
        silu_g = g * sig
        h = silu_g * u
        grad_xa, grad_a, grad_b = lora_param_grads(grad_out, xa, h.to(lora_a.dtype), lora_b, ctx.scaling,
                                                   need_a, need_b)
        grad_w, grad_bias = base_param_grads(grad_out, h, need_w, need_bias)
        del h
        grad_g = grad_u = None
        if need_g or need_u:
            grad_h = lora_input_grad(grad_out, weight, grad_xa.reshape(*grad_out.shape[:-1], -1), lora_a)
            if need_u:
                grad_u = grad_h * silu_g
            if need_g:  # silu'(g) = σ(g)·(1 + g − silu(g)), formed in silu_g's storage
                grad_g = grad_h.mul_(u).mul_(silu_g.neg_().add_(g).add_(1).mul_(sig))
        return grad_g, grad_u, grad_w, grad_bias, grad_a, grad_b, None


def swiglu_lora_down(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """down_proj(silu(g) * u) with a LoRA (A [r, I], B [O, r]) on down_proj; g, u [..., I], weight
    [O, I]. Equal, with the same gradients, to the unfused modules, at a third of their saved memory."""
    if g.shape != u.shape or not lora_shapes_fit(g.shape[-1], weight, lora_a, lora_b):
        raise ValueError(f"shapes do not fit: g {tuple(g.shape)}, u {tuple(u.shape)}, weight {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    return _SwigluLoraDown.apply(g, u, weight, bias, lora_a, lora_b, float(scaling))
