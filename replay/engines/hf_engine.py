"""Batched sampling with transformers: own decode loop over a KV cache, per-request RNG.

Each request draws from its own torch.Generator (CPU, seeded from its seed), one uniform per
token, by inverse CDF over the processed distribution. So a request's tokens depend on its prompt,
seed and settings only: not on batch size or neighbours (up to float noise in the logits). The
logprob of each sampled token is read off the distribution it was drawn from, at draw time, and
only the current step's [batch, vocab] logits ever exist.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from .base import Completion, SamplingSettings, check_requests, cut_at_stop, generator_seed

STOP_CHECK_SLACK_TOKENS = 8  # stop strings are searched in the last len(stop) + this many tokens
NUCLEUS_PROBE = 256  # top-p looks among this many most likely tokens before sorting them all


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                   top_p: float) -> torch.Tensor:
    """[B, V] raw logits -> float32 logits of the sampling distribution, cut tokens at -inf.

    Order as in transformers and vLLM: temperature, then top-k, then top-p on what is left.
    """
    scores = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        scores = scores.masked_fill(~nucleus_mask(scores, top_p), float("-inf"))
    return scores


def nucleus_mask(scores: torch.Tensor, top_p: float, probe: int = NUCLEUS_PROBE) -> torch.Tensor:
    """[B, V] bool: keep a token iff the mass of the tokens ranked above it is < top_p.

    A full-vocabulary sort per step is slow, and the nucleus is usually small: look among the
    `probe` most likely tokens first and sort everything only when a row's nucleus is wider.
    """
    probs = scores.softmax(-1)
    best, order = probs.topk(min(probe, probs.shape[-1]), dim=-1)  # descending
    if best.shape[-1] < probs.shape[-1] and bool((best.sum(-1) < top_p).any()):
        best, order = probs.sort(dim=-1, descending=True)
    keep_ranked = best.cumsum(-1) - best < top_p
    keep_ranked[:, 0] = True  # the most likely token always stays
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_ranked)


def sample_tokens(scores: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of softmax(scores) by inverse CDF, u ~ U[0, 1) per row.

    Returns tokens [B] (long) and their logprobs under softmax(scores) [B] (float32).
    """
    logprobs = scores.log_softmax(-1)
    cdf = logprobs.exp().double().cumsum(-1)
    total = cdf[:, -1:]
    tokens = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1) * total, right=True).squeeze(-1)
    # u * total can round up to total; the first index reaching total is the last token with mass.
    last_with_mass = (cdf < total).sum(-1)
    tokens = torch.minimum(tokens, last_with_mass)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded input ids, attention mask and position ids (each prompt counts from 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class HFEngine:
    """Engine over an in-memory transformers model (+ optional peft LoRA adapter on top)."""

    name = "transformers"
    logprobs_mode = "processed"
    version = f"transformers {transformers.__version__}, torch {torch.__version__}"

    def __init__(self, model, tokenizer, *, lora: str | Path | None = None, batch_size: int = 16,
                 model_name: str = "in-memory"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {i for i in _as_list(tokenizer.eos_token_id) + _as_list(generation_eos)}
        if not self.eos_ids:
            raise ValueError("the tokenizer and generation config define no eos token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        if lora is not None:
            from peft import PeftModel  # adapter stays separate: the stored base is never merged

            model = PeftModel.from_pretrained(model, str(lora))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lora = None if lora is None else str(lora)
        self.batch_size = batch_size
        self.model_name = model_name

    @classmethod
    def load(cls, model_ref, *, lora: str | Path | None = None, dtype="auto", device="auto",
             batch_size: int = 16) -> "HFEngine":
        """From a model spec or ModelRef (see replay.models.resolve_model)."""
        from ..models import load_model, load_tokenizer, resolve_model

        ref = resolve_model(model_ref) if isinstance(model_ref, str) else model_ref
        return cls(load_model(ref, dtype=dtype, device=device), load_tokenizer(ref), lora=lora,
                   batch_size=batch_size, model_name=ref.name)

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], seeds: list[int],
                 settings: SamplingSettings) -> list[Completion]:
        check_requests(prompt_token_ids, seeds)
        # Similar lengths share a batch (less padding); results do not depend on the grouping.
        order = sorted(range(len(seeds)), key=lambda i: len(prompt_token_ids[i]))
        results: list[Completion | None] = [None] * len(seeds)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            completions = self._generate_batch([list(prompt_token_ids[i]) for i in chunk],
                                               [seeds[i] for i in chunk], settings)
            for request, completion in zip(chunk, completions):
                results[request] = completion
        return results

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int],
                        settings: SamplingSettings) -> list[Completion]:
        device = self.model.device
        ids, mask, positions = (t.to(device) for t in left_pad(prompts, self.pad_id))
        generators = [torch.Generator().manual_seed(generator_seed(s)) for s in seeds]
        cache = DynamicCache(config=self.model.config)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        live = list(range(len(prompts)))  # batch row -> request; finished requests leave the batch
        next_positions = positions[:, -1] + 1
        step_ids, step_positions = ids, positions
        for _ in range(settings.max_new_tokens):
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            new_tokens, new_logprobs = self._draw(logits, [generators[r] for r in live], settings)
            del logits
            still_running = []
            for row, (request, token, logprob) in enumerate(
                    zip(live, new_tokens.tolist(), new_logprobs.tolist())):
                tokens[request].append(token)
                logprobs[request].append(logprob)
                finish[request] = self._finish_reason(tokens[request], settings)
                if finish[request] is None:
                    still_running.append(row)
            if not still_running:
                break
            if len(still_running) < len(live):
                keep = torch.tensor(still_running, device=device)
                cache.batch_select_indices(keep)
                mask, next_positions, new_tokens = mask[keep], next_positions[keep], new_tokens[keep]
                live = [live[row] for row in still_running]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            step_ids, step_positions = new_tokens.unsqueeze(-1), next_positions.unsqueeze(-1)
            next_positions = next_positions + 1
        return [Completion(t, lp, self._text(t, settings), f)
                for t, lp, f in zip(tokens, logprobs, finish)]

    @staticmethod
    def _draw(logits: torch.Tensor, generators: list[torch.Generator],
              settings: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor]:
        if settings.greedy:  # the processed distribution is a point mass: logprob 0
            tokens = logits.argmax(-1)
            return tokens, torch.zeros(tokens.shape, dtype=torch.float32)
        scores = process_logits(logits, settings.temperature, settings.top_k_cut(logits.shape[-1]),
                                settings.top_p)
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
        return sample_tokens(scores, uniforms.to(scores.device))

    def _finish_reason(self, tokens: list[int], settings: SamplingSettings) -> str | None:
        if tokens[-1] in self.eos_ids:
            return "stop"
        if settings.stop:
            window = max(len(s) for s in settings.stop) + STOP_CHECK_SLACK_TOKENS
            tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
            if any(s in tail for s in settings.stop):
                return "stop"
        return "length" if len(tokens) >= settings.max_new_tokens else None

    def _text(self, tokens: list[int], settings: SamplingSettings) -> str:
        return cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), settings.stop)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
