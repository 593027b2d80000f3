"""The fused LoRA linear: worked numbers, equality with peft's formula through autograd (values and
every gradient), peft's dtype rule, and no more kept for backward than peft keeps."""

import pytest
import torch
from torch.nn.functional import linear

from replay.core.lora import lora_linear
from tests._autograd import assert_same_values_and_grads, saved_bytes


def peft_formula(x, weight, bias, a, b, scaling):
    y = linear(x, weight, bias)
    return (y + linear(linear(x.to(a.dtype), a), b) * scaling).to(y.dtype)


def leaves(gen, lead=(2, 3), inner=5, out=4, r=2, dtype=torch.float32, bias=True):
    make = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(True)
    return make(*lead, inner), make(out, inner), make(out) if bias else None, make(r, inner), make(out, r)


def test_worked_numbers_one_unit():
    # x = 2, W = 3, b = 1, A = 0.5, B = 4, scaling 2: y = 6 + 1 + (1)·4·2 = 15
    x = torch.tensor([[2.0]], requires_grad=True)
    w, bias, a, b = (torch.tensor(v, requires_grad=True) for v in ([[3.0]], [1.0], [[0.5]], [[4.0]]))
    y = lora_linear(x, w, bias, a, b, 2.0)
    y.backward()
    assert y.item() == 15.0
    assert x.grad.item() == 3 + 0.5 * 4 * 2  # W + A·B·scaling
    assert w.grad.item() == 2.0 and bias.grad.item() == 1.0
    assert a.grad.item() == 4 * 2 * 2  # B·scaling·x
    assert b.grad.item() == 2 * 0.5 * 2  # scaling·(A·x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_equals_peft_values_and_every_gradient(bias, lead):
    gen = torch.Generator().manual_seed(len(lead))
    leaves_ = leaves(gen, lead=lead, bias=bias)
    assert_same_values_and_grads(lambda *t: lora_linear(*t, 0.75), lambda *t: peft_formula(*t, 0.75), leaves_,
                                 torch.randn(*lead, 4, generator=gen))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    args = leaves(gen, lead=(3,), inner=4, out=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 1.5), args)


def test_frozen_base_and_frozen_input_get_no_gradient():
    gen = torch.Generator().manual_seed(2)
    x, w, bias, a, b = leaves(gen)
    x, w, bias = x.detach(), w.detach(), bias.detach()  # the first layer's input, a frozen base
    lora_linear(x, w, bias, a, b, 2.0).sum().backward()
    assert x.grad is None and w.grad is None and bias.grad is None
    assert a.grad is not None and b.grad is not None


def test_bf16_base_with_float32_lora_follows_peft():
    gen = torch.Generator().manual_seed(3)
    x, w, _, a, b = leaves(gen, bias=False)
    x16, w16 = (t.detach().bfloat16().requires_grad_(True) for t in (x, w))
    ref = [t.detach().clone().requires_grad_(True) for t in (x16, w16, a, b)]
    out = lora_linear(x16, w16, None, a, b, 2.0)
    expected = peft_formula(ref[0], ref[1], None, ref[2], ref[3], 2.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    expected.float().sum().backward()
    for mine, theirs in zip((x16, w16, a, b), ref):
        assert mine.grad.dtype == theirs.grad.dtype
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=2e-2, atol=2e-2)


def test_keeps_the_input_and_the_rank_r_product_for_backward():
    gen = torch.Generator().manual_seed(4)
    x, w, _, a, b = leaves(gen, lead=(64,), inner=32, out=48, r=4, bias=False)
    w = w.detach()
    kept = saved_bytes(lambda: lora_linear(x, w, None, a, b, 2.0), exclude=(w, a, b))
    assert kept == (64 * 32 + 64 * 4) * 4  # x and x·Aᵀ


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="shapes do not fit"):
        lora_linear(torch.zeros(2, 5), torch.zeros(3, 4), None, torch.zeros(2, 5), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        lora_linear(torch.zeros(2, 5), torch.zeros(3, 5), None, torch.zeros(2, 5), torch.zeros(3, 4), 1.0)
