"""The fused SwiGLU + LoRA down-projection: worked numbers, equality with autograd through the
unfused ops (values and every gradient), peft's dtype rule, and what it keeps for backward."""

import math

import pytest
import torch

from replay.core.swiglu import swiglu_lora_down
from tests._autograd import assert_same_values_and_grads, saved_bytes


def unfused(g, u, weight, bias, a, b, scaling):
    """What the model's modules compute: down_proj(silu(g) * u) with peft's LoRA on down_proj."""
    h = torch.nn.functional.silu(g) * u
    y = torch.nn.functional.linear(h, weight, bias)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(h.to(a.dtype), a), b) * scaling
    return (y + lora).to(y.dtype)


def leaves(gen, shape=(2, 3, 5), out=4, r=2, dtype=torch.float32, bias=True):
    inner = shape[-1]
    make = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(True)
    return (make(*shape), make(*shape), make(out, inner), make(out) if bias else None,
            make(r, inner), make(out, r))


def test_worked_numbers_one_unit():
    # g = 1, u = 2, W = 3, A = 0.5, B = 4, scaling 2: h = silu(1)·2, y = 3h + (0.5h)·4·2 = 7h
    sig = 1 / (1 + math.exp(-1))
    h = sig * 2
    g, u = torch.tensor([[1.0]], requires_grad=True), torch.tensor([[2.0]], requires_grad=True)
    w, a, b = (torch.tensor([[x]], requires_grad=True) for x in (3.0, 0.5, 4.0))
    y = swiglu_lora_down(g, u, w, None, a, b, 2.0)
    y.backward()
    assert y.item() == pytest.approx(7 * h, rel=1e-6)
    # dy/dg = 7·u·silu'(1), silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
    assert g.grad.item() == pytest.approx(7 * 2 * sig * (1 + 1 * (1 - sig)), rel=1e-6)
    assert u.grad.item() == pytest.approx(7 * sig, rel=1e-6)
    assert w.grad.item() == pytest.approx(h, rel=1e-6)
    assert a.grad.item() == pytest.approx(4 * 2 * h, rel=1e-6)  # B·scaling·h
    assert b.grad.item() == pytest.approx(2 * 0.5 * h, rel=1e-6)  # scaling·(A·h)


@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_unfused_ops_values_and_every_gradient(bias):
    gen = torch.Generator().manual_seed(0)
    leaves_ = leaves(gen, bias=bias)
    assert_same_values_and_grads(lambda *t: swiglu_lora_down(*t, 0.75), lambda *t: unfused(*t, 0.75), leaves_,
                                 torch.randn(2, 3, 4, generator=gen))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    args = leaves(gen, shape=(3, 4), out=2, r=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: swiglu_lora_down(*x, 1.5), args)


def test_frozen_base_gets_no_gradient():
    gen = torch.Generator().manual_seed(2)
    g, u, w, bias, a, b = leaves(gen)
    w, bias = w.detach(), bias.detach()  # a frozen down_proj, as under LoRA
    swiglu_lora_down(g, u, w, bias, a, b, 2.0).sum().backward()
    assert w.grad is None and bias.grad is None
    assert all(x.grad is not None for x in (g, u, a, b))


def test_bf16_base_with_float32_lora_follows_peft():
    gen = torch.Generator().manual_seed(3)
    g, u, w, _, a, b = leaves(gen, bias=False)
    g16, u16, w16 = (x.detach().bfloat16().requires_grad_(True) for x in (g, u, w))
    ref = [x.detach().clone().requires_grad_(True) for x in (g16, u16, w16, a, b)]
    out = swiglu_lora_down(g16, u16, w16, None, a, b, 2.0)
    expected = unfused(ref[0], ref[1], ref[2], None, ref[3], ref[4], 2.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    expected.float().sum().backward()
    for mine, theirs in zip((g16, u16, w16, a, b), ref):
        assert mine.grad.dtype == theirs.grad.dtype
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=2e-2, atol=2e-2)


def test_keeps_g_and_u_for_backward_not_the_activation_or_the_product():
    """The memory promise: of the [tokens, intermediate] tensors only g and u are saved (the
    unfused ops keep four); the rest is the parameters and the rank-r h·Aᵀ."""
    gen = torch.Generator().manual_seed(4)
    tokens, inner, out, r = 64, 256, 8, 2
    g, u, w, _, a, b = leaves(gen, shape=(tokens, inner), out=out, r=r, bias=False)
    w = w.detach()
    block, params = tokens * inner * 4, (w.numel() + a.numel() + b.numel()) * 4
    assert saved_bytes(lambda: swiglu_lora_down(g, u, w, None, a, b, 2.0)) == 2 * block + params + tokens * r * 4
    assert saved_bytes(lambda: unfused(g, u, w, None, a, b, 2.0)) >= 4 * block


def test_shapes_that_do_not_fit_are_refused():
    g = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="shapes do not fit"):
        swiglu_lora_down(g, torch.zeros(2, 4), torch.zeros(3, 5), None, torch.zeros(2, 5), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        swiglu_lora_down(g, g, torch.zeros(3, 5), None, torch.zeros(2, 5), torch.zeros(3, 4), 1.0)
