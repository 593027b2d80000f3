"""replay's RMSNorm: worked numbers, transformers' LlamaRMSNorm to the bit in float32 (values and
gradients), bf16 within rounding, and fewer fresh [tokens, hidden] tensors per call."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from replay.core.rmsnorm import rms_norm
from tests._autograd import saved_bytes


def llama(x, weight, eps):
    """transformers' module with `weight` as its parameter (the same tensor: its gradient lands there)."""
    norm = LlamaRMSNorm(x.shape[-1], eps=eps)
    del norm.weight
    norm.weight = weight
    return norm(x)


def test_worked_numbers():
    # x = (3, 4): mean(x²) = 12.5, rms = √12.5; w = (1, 2)
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    y = rms_norm(x, torch.tensor([1.0, 2.0]), 0.0)
    rms = math.sqrt(12.5)
    assert y.tolist()[0] == pytest.approx([3 / rms, 2 * 4 / rms], rel=1e-6)
    y[0, 0].backward()  # ∂(x0/rms)/∂x = (1/rms)·(e0 − x0·x/(2·rms²))
    assert x.grad.tolist()[0] == pytest.approx([(1 - 9 / 25) / rms, -3 * 4 / 25 / rms], rel=1e-5)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_float32_equals_llama_rmsnorm_bit_for_bit(weight_grad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    weight = (torch.rand(16, generator=gen) + 0.5).requires_grad_(weight_grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(weight_grad)
    upstream = torch.randn(2, 5, 16, generator=gen)
    ours, theirs = rms_norm(x, weight, 1e-6), llama(x_ref, w_ref, 1e-6)
    assert torch.equal(ours, theirs)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    else:
        assert weight.grad is None


def test_bf16_follows_llama_rmsnorm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.rand(32, generator=gen) + 0.5).bfloat16()
    x_ref = x.detach().clone().requires_grad_(True)
    ours, theirs = rms_norm(x, weight, 1e-5), llama(x_ref, weight.clone(), 1e-5)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    ours.float().sum().backward()
    theirs.float().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, weight))


class _FreshBlocks(TorchDispatchMode):
    """Counts op outputs of at least `nbytes` that are new storage (not an input's: views and
    in-place results are not allocations)."""

    def __init__(self, nbytes):
        super().__init__()
        self.nbytes, self.count = nbytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.count += sum(isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes
                          and t.untyped_storage().data_ptr() not in inputs for t in tree_flatten(out)[0])
        return out


def test_fewer_fresh_tensors_than_autograd_through_llama_rmsnorm():
    x = torch.randn(64, 32, requires_grad=True)
    weight = torch.rand(32) + 0.5
    counts = []
    for norm in (lambda: rms_norm(x, weight, 1e-6), lambda: llama(x, weight.clone(), 1e-6)):
        with _FreshBlocks(x.numel() * 4) as forward:
            y = norm()
        with _FreshBlocks(x.numel() * 4) as backward:
            y.sum().backward()
        counts.append((forward.count, backward.count))
    assert counts[0] == (2, 3)  # the square (freed at once) and y; x̂, g (becomes ∂x) and g·x̂
    assert counts[1][0] >= 3 and counts[1][1] >= 5


def test_weight_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        rms_norm(torch.zeros(2, 4), torch.ones(3), 1e-6)


def test_keeping_the_output_instead_of_the_input_gives_the_same_gradient():
    """x̂ = y / w in the backward pass: the input gradient of LlamaRMSNorm within float32 rounding,
    with y kept for backward and x not (asked for, float32, frozen weight); otherwise x is kept."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    weight = torch.rand(16, generator=gen) + 0.5
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(8, 16, generator=gen)
    y = rms_norm(x, weight, 1e-6, keep_output=True)
    (y * upstream).sum().backward()
    (llama(x_ref, weight.clone(), 1e-6) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)

    kept = {}
    for keep in (True, False):
        out = []
        kept[keep] = saved_bytes(lambda: out.append(rms_norm(x, weight, 1e-6, keep_output=keep)), exclude=[weight])
    assert kept[True] == kept[False] == (8 * 16 + 8) * 4  # one [8, 16] block (y or x) and 1/rms
    stored = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: stored.append(t) or t, lambda t: t):
        y = rms_norm(x, weight, 1e-6, keep_output=True)
        rms_norm(x, weight.clone().requires_grad_(True), 1e-6, keep_output=True)
    assert any(t is y for t in stored[:3]) and not any(t is x for t in stored[:3])
    assert any(t is x for t in stored[3:])  # a weight that trains: x is kept, as without the flag
