"""The learning edge: a LoRA policy (peft) and the logprobs of sampled tokens under it.

Only the hidden states at completion positions reach the vocabulary projection, and that
projection is chunked (replay.core.logprobs), so [batch, length, vocab] logits never exist. Each
row is scored on the distribution its behaviour logprobs are under (replay.core.sampling): the
model's own final logits, over the row's temperature, truncated by its top-k / top-p. The
trainable policy runs replay's own kernels for its LoRA Linears, norms and MLPs where they
compute what the modules do (replay.learn.fused): the same numbers in fewer fresh tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replay.core.logprobs import FinalLogits, sampled_token_logprobs
from replay.core.sampling import RAW, Distribution
from replay.errors import ReplayError
from replay.learn.config import LearnConfig
from replay.learn.fused import fuse_for_training



@dataclass(frozen=True)
class LoraSettings:  # defaults: LearnConfig's
    r: int = LearnConfig.lora_r
    alpha: int = LearnConfig.lora_alpha
    dropout: float = LearnConfig.lora_dropout
    target_modules: tuple[str, ...] = LearnConfig.target_modules


@dataclass
class Batch:
    """Right-padded sequences (prompt + completion) and where each completion token sits."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, T] completion token ids (0 where padded)
    target_mask: torch.Tensor  # [B, T] 1 for real completion tokens
    source_positions: torch.Tensor  # [B, T] index of the hidden state that predicts each target
    temperature: torch.Tensor  # [B] the distribution of each row (replay.core.sampling.Distribution)
    top_k: torch.Tensor  # [B] 0: no cut
    top_p: torch.Tensor  # [B] 1: no cut

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def make_batch(prompts: list[list[int]], completions: list[list[int]],
               distributions: list[Distribution] | None = None, pad_id: int = 0) -> Batch:
    distributions = distributions or [RAW] * len(prompts)
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
                 torch.tensor([d.temperature for d in distributions], dtype=torch.float32),
                 torch.tensor([d.top_k for d in distributions], dtype=torch.long),
                 torch.tensor([d.top_p for d in distributions], dtype=torch.float32))


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _parts(model):
    """(transformer body, lm_head) of a causal LM, through any peft (and DDP) wrapper."""
    inner = _inner(getattr(model, "module", model))
    return inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model, inner.get_output_embeddings()


def final_logits(config) -> FinalLogits:
    """The model family's last step after lm_head, read from its config (checked by check_head)."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: logits * logit_scale
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if scaling:
        scale /= float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3
    return FinalLogits(scale=scale, softcap=float(softcap) if softcap else None)


def check_head(model) -> FinalLogits:
    """Our head path must give the model's own logits: compare on a few tokens, refuse otherwise
    (a model family with final processing this learner does not know)."""
    inner = _inner(getattr(model, "module", model))
    body, head = _parts(model)
    if any("lora" in name for name, _ in head.named_modules()):
        raise ReplayError("LoRA on the output embedding (lm_head in --target-modules) is not supported: "
                          "the learner's chunked head reads lm_head.weight")
    final = final_logits(inner.config)
    device = head.weight.device
    ids = torch.arange(1, 5, device=device).unsqueeze(0) % inner.config.vocab_size
    with torch.no_grad():
        expected = inner(input_ids=ids).logits[0].float()
        hidden = body(input_ids=ids).last_hidden_state[0]
        raw = (hidden @ head.weight.T).float()
        if getattr(head, "bias", None) is not None:
            raw = raw + head.bias.float()
        ours = raw * final.scale
        if final.softcap:
            ours = final.softcap * torch.tanh(ours / final.softcap)
    tolerance = 1e-3 if expected.abs().max() == 0 else 1e-3 * float(expected.abs().max()) + 1e-3
    if not torch.allclose(ours, expected, atol=tolerance, rtol=1e-2):
        raise ReplayError(f"{type(inner).__name__}: its final logits are not lm_head(h) with the known final "
                          f"processing (scale, softcap); the learner cannot reproduce them "
                          f"(max difference {float((ours - expected).abs().max()):.3g})")
    return final


def token_logprobs(model, batch: Batch, chunk_size: int | None = None,
                   final: FinalLogits | None = None) -> torch.Tensor:
    """[B, T] logprob of each completion token under `model`, on each row's distribution."""
    body, head = _parts(model)
    device = head.weight.device
    batch = batch.to(device)
    final = final if final is not None else final_logits(_inner(getattr(model, "module", model)).config)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    live = batch.target_mask > 0
    rows = torch.arange(hidden.shape[0], device=device).unsqueeze(1).expand_as(batch.source_positions)[live]
    per_row = [x.unsqueeze(1).expand_as(batch.source_positions)[live]
               for x in (batch.temperature, batch.top_k, batch.top_p)]
    values = sampled_token_logprobs(hidden[rows, batch.source_positions[live]], head.weight, batch.targets[live],
                                    chunk_size=chunk_size, bias=getattr(head, "bias", None),
                                    temperature=per_row[0], top_k=per_row[1], top_p=per_row[2], final=final)
    return torch.zeros(batch.target_mask.shape, dtype=values.dtype, device=device).masked_scatter(live, values)


class Scorer(torch.nn.Module):
    """token_logprobs as a module, so DistributedDataParallel can wrap the whole scoring pass."""

    def __init__(self, model, final: FinalLogits | None = None):
        super().__init__()
        self.model = model
        self.final = final

    def forward(self, *batch_fields: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.model, Batch(*batch_fields), final=self.final)


def load_policy(model_ref, init_adapter, lora: LoraSettings, gradient_checkpointing: bool = False,
                device: str = "auto", dtype: str = "auto"):
    """The base model (frozen, `dtype`) on `device` with a trainable float32 LoRA: a fresh one, or
    `init_adapter` continued. LoRA weights (and so AdamW's state) stay float32 whatever the base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from replay.models import load_model

    base = load_model(model_ref, dtype=dtype, device=device)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    else:
        check_targets(base, lora.target_modules)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(base, config, autocast_adapter_dtype=True)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    check_head(model)
    fuse_for_training(model)
    return model


def check_targets(model, targets: tuple[str, ...]) -> None:
    """Each --target-modules name must match a module (peft's rule: the module's dotted name is the
    target or ends with `.target`); the default list needs only some to match (model families differ)."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if not missing or (tuple(targets) == LearnConfig.target_modules and len(missing) < len(targets)):
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    raise ReplayError(f"--target-modules {','.join(missing)}: no module of {type(model).__name__} has that name; "
                      f"its linear layers are {', '.join(linear)}")


def frozen_policy(model_ref, adapter, device: str = "auto", dtype: str = "auto"):
    """A no-grad copy of a past policy (base + that round's adapter) for recomputing π_old."""
    from peft import PeftModel

    from replay.models import load_model

    model = load_model(model_ref, dtype=dtype, device=device)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check_head(model)
    return model
