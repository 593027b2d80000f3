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


class _SwigluLoraDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight, bias, lora_a, lora_b, scaling):
        h = torch.nn.functional.silu(g) * u
        y = torch.nn.functional.linear(h, weight, bias)
        ha = torch.nn.functional.linear(h.to(lora_a.dtype), lora_a)
        out = (y + torch.nn.functional.linear(ha, lora_b) * scaling).to(y.dtype)
        ctx.save_for_backward(g, u, weight, lora_a, lora_b, ha)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g, u, weight, lora_a, lora_b, ha = ctx.saved_tensors
        need_g, need_u, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:6]
        scaling = ctx.scaling
        sig = torch.sigmoid(g)
        silu = g * sig
        h = silu * u
        grad_lora = grad_out.to(lora_b.dtype)
        grad_ha = (grad_lora @ lora_b) * scaling  # [.., r]
        grad_lb = (grad_lora.flatten(0, -2).T @ ha.flatten(0, -2)) * scaling if need_lb else None
        grad_a = grad_ha.flatten(0, -2).T @ h.to(lora_a.dtype).flatten(0, -2) if need_a else None
        grad_w = grad_out.flatten(0, -2).T @ h.flatten(0, -2) if need_w else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if need_b and ctx.has_bias else None
        grad_g = grad_u = None
        if need_g or need_u:
            grad_h = (grad_out @ weight).add_((grad_ha @ lora_a).to(grad_out.dtype))
            if need_u:
                grad_u = grad_h * silu
            if need_g:  # silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
                grad_g = grad_h.mul_(u).mul_(sig.mul_(g - silu + 1))
        return grad_g, grad_u, grad_w, grad_bias, grad_a, grad_lb, None


def swiglu_lora_down(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """down_proj(silu(g) * u) with a LoRA (A [r, I], B [O, r]) on down_proj; g, u [..., I], weight
    [O, I]. Equal, with the same gradients, to the unfused modules, at a third of their saved memory."""
    if g.shape != u.shape or weight.shape[1] != g.shape[-1] or lora_a.shape[1] != g.shape[-1] \
            or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(f"shapes do not fit: g {tuple(g.shape)}, u {tuple(u.shape)}, weight {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    return _SwigluLoraDown.apply(g, u, weight, bias, lora_a, lora_b, float(scaling))
