"""A linear layer with a LoRA, y = x·Wᵀ + b + (x·Aᵀ)·Bᵀ · scaling, as one autograd Function.

peft computes it as four modules' worth of tensors: the base output, the rank-r product, its
scaled copy and their sum, each a fresh [tokens, out] block (and as many again in the backward
pass, where autograd also adds the base's and the LoRA's input gradients in a third block). On a
CPU every fresh block is page faults and a memory pass; here the LoRA term is added into the base
output in place (one addmm), and the input gradient likewise. It keeps what peft keeps for
backward, x and the rank-r x·Aᵀ, except that a bf16 x is kept as bf16 (peft keeps its float32
copy). peft's dtype rule holds: with a float32 LoRA on a bf16 base the LoRA term is formed in
float32, added in float32 and the sum cast back to bf16.
"""

from __future__ import annotations

import torch
from torch.nn.functional import linear


def add_lora_(y: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + (xa·Bᵀ)·scaling, in y's storage when y (fresh, contiguous) has B's dtype."""
    if y.dtype != lora_b.dtype:
        return (y + linear(xa, lora_b) * scaling).to(y.dtype)
    y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), lora_b.T, alpha=scaling)
    return y


def lora_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, grad_xa: torch.Tensor,
                    lora_a: torch.Tensor) -> torch.Tensor:
    """∂L/∂x = grad_y·W + grad_xa·A, the second term added in place (cast to x's dtype if it differs)."""
    grad_x = grad_y @ weight
    if grad_x.dtype == lora_a.dtype:
        grad_x.view(-1, grad_x.shape[-1]).addmm_(grad_xa.reshape(-1, grad_xa.shape[-1]), lora_a)
    else:
        grad_x += (grad_xa @ lora_a).to(grad_x.dtype)
    return grad_x


def lora_param_grads(grad_y, xa, x_lora, lora_b, scaling, need_a: bool, need_b: bool):
    """(∂L/∂(x·Aᵀ), ∂L/∂A, ∂L/∂B) from the output gradient; x_lora is the LoRA's input in A's dtype."""
    grad_lora = grad_y.to(lora_b.dtype).reshape(-1, lora_b.shape[0])
    xa2 = xa.reshape(-1, xa.shape[-1])
    grad_xa = (grad_lora @ lora_b).mul_(scaling)  # [tokens, r]
    grad_b = (grad_lora.T @ xa2).mul_(scaling) if need_b else None
    grad_a = grad_xa.T @ x_lora.reshape(-1, x_lora.shape[-1]) if need_a else None
    return grad_xa, grad_a, grad_b


def base_param_grads(grad_y, x, need_w: bool, need_bias: bool):
    """(∂L/∂W, ∂L/∂b) of x·Wᵀ + b from the output gradient, None where not needed (a frozen base,
    or no bias: autograd asks for no gradient of a None input)."""
    grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
    grad_w = grad_y2.T @ x.reshape(-1, x.shape[-1]) if need_w else None
    return grad_w, grad_y2.sum(0) if need_bias else None


def lora_shapes_fit(inner: int, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """An input of width `inner` fits W [O, inner], A [r, inner] and B [O, r]."""
    return weight.shape[1] == inner == lora_a.shape[1] and lora_b.shape == (weight.shape[0], lora_a.shape[0])


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        xa = linear(x.to(lora_a.dtype), lora_a)
        y = add_lora_(linear(x, weight, bias), xa, lora_b, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_xa, grad_a, grad_b = lora_param_grads(grad_y, xa, x.to(lora_a.dtype), lora_b, ctx.scaling,
                                                   need_a, need_b)
        grad_x = lora_input_grad(grad_y, weight, grad_xa.reshape(*grad_y.shape[:-1], -1), lora_a) if need_x else None
        grad_w, grad_bias = base_param_grads(grad_y, x, need_w, need_bias)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x [..., I] · Wᵀ [I, O] + b + (x·Aᵀ)·Bᵀ · scaling with A [r, I], B [O, r]."""
    if not lora_shapes_fit(x.shape[-1], weight, lora_a, lora_b):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))
