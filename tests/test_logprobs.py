"""Chunked sampled-token logprobs equal the dense log_softmax + gather, values and gradients."""

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from replay.core.logprobs import FinalLogits, sampled_token_logprobs


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


# --- the sampling distribution: final logits, temperature, top-k, top-p ---------------------------

from replay.core.logprobs import truncation_threshold  # noqa: E402
from replay.engines.hf_engine import process_logits  # noqa: E402


def dense_processed(hidden, weight, targets, bias, temperature, top_k, top_p, final=FinalLogits()):
    """Reference: full logits, the engine's own process_logits row by row (its cut set fixed)."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logits = logits * final.scale
    if final.softcap:
        logits = final.softcap * torch.tanh(logits / final.softcap)
    out = []
    for n in range(hidden.shape[0]):
        k = int(top_k[n])
        with torch.no_grad():
            cut = process_logits(logits[n:n + 1].detach(), float(temperature[n]),
                                 k if 0 < k < weight.shape[0] else None, float(top_p[n])) == float("-inf")
        scores = (logits[n:n + 1] / float(temperature[n])).masked_fill(cut, float("-inf"))
        out.append(torch.log_softmax(scores, -1)[0, targets[n]])
    return torch.stack(out)


def test_worked_numbers_temperature_top_k_top_p():
    # logits [2, 1, 0, -1] at T = 0.5 -> scores [4, 2, 0, -2]; softmax ≈ [.8650, .1171, .0158, .0021]
    weight = torch.eye(4)
    hidden = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 5)
    targets = torch.tensor([1, 1, 2, 0, 1])
    t = torch.full((5,), 0.5)
    top_k = torch.tensor([0, 2, 2, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.9])
    out = sampled_token_logprobs(hidden, weight, targets, temperature=t, top_k=top_k, top_p=top_p)
    full = 2 - torch.logsumexp(torch.tensor([4.0, 2, 0, -2]), 0)
    kept2 = 2 - torch.logsumexp(torch.tensor([4.0, 2]), 0)  # -2.126928
    assert out[0] == pytest.approx(float(full), abs=1e-6)
    assert out[1] == pytest.approx(-2.126928, abs=1e-6) == float(kept2)
    assert out[2] == float("-inf")  # token 2 is cut by top-k = 2
    assert out[3] == pytest.approx(0.0, abs=1e-7)  # mass above token 1 is .865 >= .8: only token 0 left
    assert out[4] == pytest.approx(-2.126928, abs=1e-6)  # .865 < .9 keeps token 1, .982 cuts token 2
    threshold = truncation_threshold(hidden / 0.5, top_k, top_p)
    assert threshold.tolist() == [float("-inf"), 2.0, 2.0, 4.0, 2.0]


def test_worked_numbers_final_softcap_and_scale():
    weight = torch.eye(2)
    hidden = torch.tensor([[2.0, 0.0]])
    capped = sampled_token_logprobs(hidden, weight, torch.tensor([0]), final=FinalLogits(softcap=1.0))
    # cap · tanh(z / cap): logits [tanh 2, 0] = [.964028, 0]
    assert float(capped[0]) == pytest.approx(0.964028 - math.log(math.exp(0.964028) + 1), abs=1e-6)
    scaled = sampled_token_logprobs(hidden, weight, torch.tensor([0]), final=FinalLogits(scale=0.5),
                                    temperature=torch.tensor([2.0]))
    assert float(scaled[0]) == pytest.approx(0.5 - math.log(math.exp(0.5) + 1), abs=1e-6)  # 2 · .5 / 2


@pytest.mark.parametrize("final", [FinalLogits(), FinalLogits(softcap=3.0), FinalLogits(scale=0.25)])
@pytest.mark.parametrize("chunk_size", [1, 16, 1000])
def test_processed_matches_the_engine_distribution_values_and_gradients(final, chunk_size):
    gen = torch.Generator().manual_seed(chunk_size)
    n, h, v = 40, 12, 97
    hidden = (torch.randn(n, h, generator=gen) * 2).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen).requires_grad_(True)
    bias = torch.randn(v, generator=gen).requires_grad_(True)
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.5] * 10)
    top_k = torch.tensor([0, 5, 0, 20, 1] * 8)
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.95, 0.5, 0.9, 1.0, 0.3] * 5)
    # targets drawn from each row's own truncated distribution, as an engine samples them
    with torch.no_grad():
        logits = hidden @ weight.T + bias
        logits = final.softcap * torch.tanh(logits * final.scale / final.softcap) if final.softcap else logits * final.scale
        targets = torch.stack([torch.multinomial(process_logits(logits[i:i + 1], float(temperature[i]),
                                                                int(top_k[i]) or None, float(top_p[i])).softmax(-1),
                                                 1, generator=gen)[0, 0] for i in range(n)])
    upstream = torch.randn(n, generator=gen)

    def run(fn):
        for x in (hidden, weight, bias):
            x.grad = None
        out = fn()
        (out * upstream).sum().backward()
        return out.detach(), [x.grad.clone() for x in (hidden, weight, bias)]

    ours, our_grads = run(lambda: sampled_token_logprobs(hidden, weight, targets, chunk_size=chunk_size, bias=bias,
                                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                                         final=final))
    ref, ref_grads = run(lambda: dense_processed(hidden, weight, targets, bias, temperature, top_k, top_p, final))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64_with_truncation_and_softcap():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    with torch.no_grad():
        targets = (hidden @ weight.T + bias).argmax(-1)  # the best token is never cut
    options = dict(temperature=torch.tensor([0.7, 1.0, 1.5, 0.7, 1.0, 2.0]), top_k=torch.tensor([3, 0, 2, 0, 5, 1]),
                   top_p=torch.tensor([1.0, 0.7, 0.9, 0.5, 1.0, 1.0]), final=FinalLogits(scale=0.7, softcap=2.0))
    assert torch.autograd.gradcheck(
        lambda h, w, b: sampled_token_logprobs(h, w, targets, chunk_size=4, bias=b, **options), (hidden, weight, bias))


def test_a_token_outside_the_kept_set_has_logprob_minus_inf_and_no_gradient():
    hidden = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    weight = torch.eye(3)
    out = sampled_token_logprobs(hidden, weight, torch.tensor([2]), top_k=torch.tensor([1]))
    assert out[0] == float("-inf")
    out.clamp(min=-20).sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_truncation_never_holds_full_logits_for_all_positions():
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
    weight = torch.randn(v, h)
    with LargestAlloc():
        sampled_token_logprobs(hidden, weight, torch.zeros(n, dtype=torch.long), chunk_size=chunk,
                               temperature=torch.full((n,), 0.7), top_k=torch.full((n,), 50),
                               top_p=torch.full((n,), 0.9)).clamp(min=-20).sum().backward()
    assert LargestAlloc.largest <= max(chunk * v, v * h)


def test_greedy_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampled_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long),
                               temperature=torch.tensor([1.0, 0.0]))


class _LiveBlocks(TorchDispatchMode):
    """Counts the distinct storages of at least `nbytes` that are alive at once (peak), op by op."""

    def __init__(self, nbytes: int):
        super().__init__()
        self.nbytes, self.refs, self.peak = nbytes, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.nbytes:
                self.refs.append(weakref.ref(t))
        self.refs = [r for r in self.refs if r() is not None]
        self.peak = max(self.peak, len({r().untyped_storage().data_ptr() for r in self.refs}))
        return out


@pytest.mark.parametrize("setting, blocks", [
    ({}, (1, 1)),
    ({"final": FinalLogits(scale=0.5)}, (1, 1)),
    ({"top_k": 5}, (1, 1)),
    ({"final": FinalLogits(softcap=3.0)}, (1, 2)),  # the backward keeps tanh for its derivative
])
def test_one_vocabulary_block_is_alive_at_a_time(setting, blocks):
    """The memory promise: each chunk's steps run in place on its [chunk, V] block, and that block
    is freed before the next chunk's exists (forward and backward)."""
    gen = torch.Generator().manual_seed(1)
    n, h, v, chunk = 64, 4, 5000, 16  # weight [V, 4] is under the threshold; a [16, V] float block is not
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    kwargs = {k: torch.full((n,), val) if k == "top_k" else val for k, val in setting.items()}
    with _LiveBlocks(chunk * v * 4 // 2) as forward:  # half a block: bool masks [chunk, V] do not count
        out = sampled_token_logprobs(hidden, weight, targets, chunk_size=chunk, **kwargs)
    with _LiveBlocks(chunk * v * 4 // 2) as backward:
        out.sum().backward()
    assert (forward.peak, backward.peak) == blocks


def test_default_chunk_is_sized_by_bytes():
    from replay.core.logprobs import BLOCK_BYTES, block_rows

    assert block_rows(49152) == BLOCK_BYTES // (49152 * 4) == 341
    assert block_rows(151936) == 110 and block_rows(151936, torch.float64) == 55
    assert block_rows(10**9) == 1  # never zero
