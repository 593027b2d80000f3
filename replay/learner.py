"""The learning edge: a LoRA policy (peft) and the logprobs of sampled tokens under it.

Only the hidden states at completion positions reach the vocabulary projection, and that
projection is chunked (replay.core.logprobs), so [batch, length, vocab] logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .core.logprobs import sampled_token_logprobs

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS


@dataclass
class Batch:
    """Right-padded sequences (prompt + completion) and where each completion token sits."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, T] completion token ids (0 where padded)
    target_mask: torch.Tensor  # [B, T] 1 for real completion tokens
    source_positions: torch.Tensor  # [B, T] index of the hidden state that predicts each target
    temperature: torch.Tensor  # [B] the sampling temperature of each row


def make_batch(prompts: list[list[int]], completions: list[list[int]], temperatures: list[float],
               pad_id: int = 0) -> Batch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width, t_max = max(lengths), max(1, max(len(c) for c in completions))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    targets = torch.zeros((n, t_max), dtype=torch.long)
    target_mask = torch.zeros((n, t_max), dtype=torch.float32)
    positions = torch.zeros((n, t_max), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        if c:
            targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            target_mask[i, : len(c)] = 1.0
            # the hidden state at position k predicts token k+1
            positions[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
    return Batch(input_ids, attention, targets, target_mask, positions,
                 torch.tensor(temperatures, dtype=torch.float32))


def _parts(model):
    """(transformer body, lm_head) of a causal LM, through any peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model, inner.get_output_embeddings()


def token_logprobs(model, batch: Batch, chunk_size: int = 1024) -> torch.Tensor:
    """[B, T] logprob of each completion token under `model` at the row's sampling temperature."""
    body, head = _parts(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    flat_mask = batch.target_mask.reshape(-1) > 0
    rows = torch.arange(hidden.shape[0]).unsqueeze(1).expand_as(batch.source_positions).reshape(-1)[flat_mask]
    cols = batch.source_positions.reshape(-1)[flat_mask]
    # logits / T == (h / T) @ W^T: scale the few hidden states we keep, not the logits
    scale = batch.temperature.clamp_min(1e-6).unsqueeze(1).expand_as(batch.source_positions).reshape(-1)[flat_mask]
    picked = hidden[rows, cols] / scale.unsqueeze(1).to(hidden.dtype)
    bias = getattr(head, "bias", None)
    values = sampled_token_logprobs(picked, head.weight, batch.targets.reshape(-1)[flat_mask],
                                    chunk_size=chunk_size, bias=bias)
    return torch.zeros(batch.target_mask.shape, dtype=values.dtype).masked_scatter(batch.target_mask > 0, values)


def load_policy(base_model_dir: Path, init_adapter: Path | None, lora: LoraSettings,
                gradient_checkpointing: bool = False):
    """The base model (frozen) with a trainable LoRA: a fresh one, or `init_adapter` continued."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if init_adapter is not None:
        return PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def frozen_policy(base_model_dir: Path, adapter: Path | None):
    """A no-grad copy of a past policy (base + that round's adapter) for recomputing π_old."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
