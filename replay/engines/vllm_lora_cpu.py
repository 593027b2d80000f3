"""A faster LoRA path for vLLM on CPU, loaded into every vLLM process as a general plugin.

vLLM's CPU LoRA ops (vllm.lora.ops.torch_ops) gather one copy of the LoRA matrices per token
(`weights[token_indices]`, [tokens, rank, hidden]) before an einsum. With one adapter for the
whole batch, that copies megabytes per token per layer: LoRA requests ran at ~1/5 of the base
model's speed here (bench/vllm_bench.py). Grouping the tokens by adapter index and doing one
matmul per adapter gives the same numbers without the copies.

The replacement keeps each op's signature and output handling; only "gather + einsum" becomes
`grouped_lora_matmul`. Registered through the `vllm.general_plugins` entry point (pyproject), so
the engine-core process that runs the model gets it too. Set REPLAY_VLLM_LORA_PATCH=0 to keep
vLLM's own ops.
"""

from __future__ import annotations

import os

import torch

PATCHED = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def grouped_lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """[b, in] x weights [n, (1,) out, in] picked per row by indices [b] -> [b, out].

    Equal to einsum("bi,boi->bo", inputs, weights[indices]) (index -1 picks the last slot, as
    indexing does), computed with one matmul per distinct index.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    distinct = torch.unique(indices)
    if distinct.numel() == 1:
        return inputs @ weights[distinct[0]].to(dtype).t()
    out = inputs.new_empty((inputs.shape[0], weights.shape[1]))
    for index in distinct.tolist():
        rows = indices == index
        out[rows] = inputs[rows] @ weights[index].to(dtype).t()
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # paddings may differ
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def register() -> None:
    """vLLM general-plugin hook: swap in the grouped ops (idempotent; vLLM may call it often)."""
    if os.environ.get("REPLAY_VLLM_LORA_PATCH", "1") == "0":
        return
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # another vLLM layout: leave its ops alone
        return
    for module in (lora_ops, punica_cpu):  # punica_cpu bound the names at import
        for name in PATCHED:
            if hasattr(module, name):
                setattr(module, name, globals()[name])
