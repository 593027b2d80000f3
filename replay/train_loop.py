"""The optimisation loop of `learn`: micro-batches, gradient accumulation, one metrics row per step."""

from __future__ import annotations

import random
import time

import torch

from .core.loss import policy_loss
from .learner import LoraSettings, load_policy, make_batch, token_logprobs
from .progress import progress_bar


def _padded(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        if v:
            out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def plan_steps(indices: list[int], lengths: list[int], micro: int, accum: int, seed: int,
               epochs: int) -> list[tuple[int, list[list[int]]]]:
    """[(epoch, micro-batches of one optimizer step)]: each epoch shuffles the samples and cuts
    them into steps of micro * accum; inside a step the samples are sorted by length before they
    are cut into micro-batches. A step's gradient depends only on its set of samples, so the
    sort changes nothing but the padding (real completions vary from a few tokens to the cap)."""
    steps = []
    for epoch in range(epochs):
        order = list(indices)
        random.Random(seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order), micro * accum):
            step = sorted(order[start:start + micro * accum], key=lambda i: lengths[i])
            steps.append((epoch, [step[j:j + micro] for j in range(0, len(step), micro)]))
    return steps


def _mean(rows: list[dict], key: str) -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else 0.0


def train(cfg, model_ref, init_adapter, samples, result, adv_metrics,
          on_step=None) -> tuple[list[dict], dict, object]:
    """Train the LoRA policy; returns (learn_metrics rows, summary, model). on_step(row) sees each
    step's metrics row as it is made (live metrics: replay.metrics_sink)."""
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules))
    model = load_policy(model_ref.path, init_adapter, lora, cfg.gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    # samples with zero advantage (or zero weight) contribute no gradient: skip their compute
    active = [i for i in range(len(samples))
              if float(result.advantage[i]) != 0.0 and float(result.weight[i]) != 0.0 and samples[i].completion_ids]
    steps_per_epoch = -(-len(active) // (cfg.micro_batch_size * cfg.grad_accum)) if active else 0
    rows: list[dict] = []
    started = time.perf_counter()
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    steps = plan_steps(active, lengths, cfg.micro_batch_size, cfg.grad_accum, cfg.seed, cfg.epochs)
    with progress_bar(f"learn round {cfg.round} ({cfg.objective})", total=steps_per_epoch * cfg.epochs,
                      unit="steps") as bar:
        for epoch, micro_batches in steps:
            pending = []
            step_samples = sum(len(idx) for idx in micro_batches)
            step_tokens = sum(len(samples[i].completion_ids) for idx in micro_batches for i in idx)
            for idx in micro_batches:
                chunk = [samples[i] for i in idx]
                batch = make_batch([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                   [s.temperature for s in chunk])
                logprobs = token_logprobs(model, batch)
                old = _padded([s.old_logprobs for s in chunk], batch.targets.shape[1])
                loss, metrics = policy_loss(
                    logprobs, old, result.advantage[idx].to(torch.float32), batch.target_mask,
                    weights=result.weight[idx].to(torch.float32), clip_eps=cfg.clip_eps,
                    clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip, tis_cap=cfg.tis_cap,
                    aggregation=cfg.aggregation)
                # each micro-batch's mean counts by its share of the step (sequences, or tokens for
                # token-mean): the step's loss is the mean over all its samples, however it is cut
                share = (float(batch.target_mask.sum()) / step_tokens if cfg.aggregation == "token-mean"
                         else len(idx) / step_samples)
                (loss * share).backward()
                pending.append({k: float(v) for k, v in metrics.items()} | {"loss": float(loss.detach())})
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.append(_metrics_row(cfg, len(rows), epoch, pending, float(grad_norm), adv_metrics, started))
            if on_step is not None:
                on_step(rows[-1])
            tokens_per_s = sum(r["tokens"] for r in rows) / max(time.perf_counter() - started, 1e-9)
            bar.advance(1, f"loss {rows[-1]['loss']:+.4f} clip {rows[-1]['clip_frac']:.2f} "
                           f"|g| {rows[-1]['grad_norm']:.3f} {tokens_per_s:.0f} tok/s")
    model.eval()
    summary = {"trained_samples": len(active), "optimizer_steps": len(rows),
               "final_loss": rows[-1]["loss"] if rows else None,
               "mean_clip_frac": _mean(rows, "clip_frac"), "seconds": time.perf_counter() - started,
               "tokens": int(sum(r["tokens"] for r in rows))}
    return rows, summary, model


def _metrics_row(cfg, step, epoch, pending, grad_norm, adv_metrics, started) -> dict:
    return dict(round=cfg.round, adapter_name=cfg.adapter_name, objective=cfg.objective, step=step,
                epoch=epoch, loss=_mean(pending, "loss"),
                clip_frac=_mean(pending, "clip_frac"), dual_clip_frac=_mean(pending, "dual_clip_frac"),
                ratio_mean=_mean(pending, "ratio_mean"), ratio_max=max(p["ratio_max"] for p in pending),
                grad_norm=grad_norm, tokens=int(sum(p["tokens"] for p in pending)),
                nonzero_adv_share=float(adv_metrics.get("nonzero_adv_share", 0.0)),
                negative_group_share=float(adv_metrics.get("negative_group_share", 0.0)),
                lr=cfg.lr, seconds=time.perf_counter() - started)
