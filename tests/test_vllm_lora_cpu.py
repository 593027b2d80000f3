"""The grouped LoRA ops that replace vLLM's per-token gather on CPU: same numbers as vLLM's own."""

import importlib.util

import pytest
import torch

from replay.engines import vllm_lora_cpu as grouped


def reference(inputs, weights, indices):
    picked = weights[indices]  # what vLLM's torch ops do: one weight copy per row
    if picked.dim() == 4:
        picked = picked.squeeze(1)
    return torch.einsum("bi,boi->bo", inputs, picked)


@pytest.mark.parametrize("indices", [[0, 0, 0, 0, 0], [1, 0, 1, -1, 0], [-1, -1, -1, -1, -1]])
@pytest.mark.parametrize("four_dim", [True, False])
def test_grouped_matmul_equals_the_per_row_gather(indices, four_dim):
    torch.manual_seed(0)
    inputs, weights = torch.randn(5, 12), torch.randn(3, 7, 12)
    if four_dim:
        weights = weights.unsqueeze(1)
    index = torch.tensor(indices)
    got = grouped.grouped_lora_matmul(inputs, weights, index, torch.float32)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, reference(inputs, weights, index), rtol=1e-5, atol=1e-5)


def test_ops_write_their_outputs_like_vllms():
    torch.manual_seed(1)
    x, a, index = torch.randn(4, 12), torch.randn(2, 1, 3, 12), torch.tensor([0, 1, 1, 0])
    shrunk = torch.zeros(4, 3)
    grouped.bgmv_shrink(x, a, shrunk, index, 0.5)
    torch.testing.assert_close(shrunk, 0.5 * reference(x, a, index))
    b = torch.randn(2, 1, 6, 3)
    out = torch.ones(4, 10)
    grouped.bgmv_expand_slice(shrunk, b, out, index, 2, 6, add_inputs=True)
    expected = torch.ones(4, 10)
    expected[:, 2:8] += reference(shrunk, b, index)
    torch.testing.assert_close(out, expected)
    out = torch.zeros(4, 6)
    grouped.bgmv_expand(shrunk, b, out, index, add_inputs=False)
    torch.testing.assert_close(out, reference(shrunk, b, index))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_register_swaps_vllms_cpu_ops_and_can_be_turned_off(monkeypatch):
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    saved = {(m, n): getattr(m, n) for m in (lora_ops, punica_cpu) for n in grouped.PATCHED}
    try:
        monkeypatch.setenv("REPLAY_VLLM_LORA_PATCH", "0")
        grouped.register()
        assert all(getattr(m, n) is saved[m, n] for m, n in saved)  # left alone
        monkeypatch.setenv("REPLAY_VLLM_LORA_PATCH", "1")
        grouped.register()
        assert all(getattr(m, n) is getattr(grouped, n) for m, n in saved)
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)
