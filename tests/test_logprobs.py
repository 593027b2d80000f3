"""Chunked sampled-token logprobs equal the dense log_softmax + gather, values and gradients."""

import pytest
import torch

from replay.core.logprobs import sampled_token_logprobs


def dense(hidden, weight, targets, bias=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def grads(fn, hidden, weight, bias, targets, upstream):
    leaves = [x for x in (hidden, weight, bias) if x is not None]
    for x in leaves:
        x.grad = None
    out = fn(hidden, weight, targets, bias=bias)
    (out * upstream).sum().backward()
    return out.detach(), [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_dense_values_and_gradients(chunk_size, with_bias):
    gen = torch.Generator().manual_seed(chunk_size)
    n, h, v = 53, 24, 97
    hidden = (torch.randn(n, h, generator=gen) * 2).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen).requires_grad_(True)
    bias = torch.randn(v, generator=gen).requires_grad_(True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    ours, our_grads = grads(lambda *a, **k: sampled_token_logprobs(*a, chunk_size=chunk_size, **k),
                            hidden, weight, bias, targets, upstream)
    ref, ref_grads = grads(dense, hidden, weight, bias, targets, upstream)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda h, w, b: sampled_token_logprobs(h, w, targets, chunk_size=4, bias=b), (hidden, weight, bias))


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # a frozen lm_head, as under LoRA
    targets = torch.randint(0, 30, (10,))
    sampled_token_logprobs(hidden, weight, targets, chunk_size=3).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    dense(ref_hidden, weight, targets).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=1e-5, rtol=1e-5)


def test_never_holds_full_logits_for_all_positions():
    """Count the largest float tensor allocated during forward + backward via a dispatch hook."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAlloc(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    LargestAlloc.largest = max(LargestAlloc.largest, t.numel())
            return out

    n, h, v, chunk = 256, 8, 500, 16
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with LargestAlloc():
        sampled_token_logprobs(hidden, weight, targets, chunk_size=chunk).sum().backward()
    assert LargestAlloc.largest <= max(chunk * v, v * h)
    assert LargestAlloc.largest < n * v


def test_empty_input_and_shape_errors():
    out = sampled_token_logprobs(torch.zeros(0, 4, requires_grad=True), torch.randn(5, 4), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    with pytest.raises(ValueError):
        sampled_token_logprobs(torch.zeros(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        sampled_token_logprobs(torch.zeros(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
