"""The optimisation loop of `learn`: micro-batches, gradient accumulation, one metrics row per step.

`train` takes a model (so tests hand it any small one) and works the same in one process or as one
rank of N (replay.learn.distributed): every rank builds the same seeded step plan (steps of
micro x accum x N samples: N ranks with accumulation a equal one rank with accumulation a·N) and
takes every N-th micro-batch of each step, padded with zero-weight passes so all ranks run the same number of
forward/backward passes; gradients sync once per step (the last pass), metrics are all-reduced.
"""

from __future__ import annotations

import contextlib
import random
import time

import torch

from replay.core.advantages import KIND_NAMES, kind_shares
from replay.core.behaviour import replay_metrics
from replay.core.loss import policy_loss
from replay.errors import ReplayError
from replay.progress import progress_bar
from replay.runtime import trim_freed_memory

from .distributed import Ranks, rank_share_of
from .policy import Scorer, check_head, make_batch

METRIC_KEYS = ("loss", "clip_frac", "dual_clip_frac", "ratio_mean")


def _padded(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        if v:
            out[i, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def plan_steps(indices: list[int], lengths: list[int], micro: int, accum: int, seed: int,
               epochs: int, steps: int | None = None) -> list[tuple[int, list[list[int]]]]:
    """[(epoch, micro-batches of one optimizer step)]: each epoch shuffles the samples and cuts
    them into steps of micro * accum; inside a step the samples are sorted by length before they
    are cut into micro-batches. A step's gradient depends only on its set of samples, so the
    sort changes nothing but the padding (real completions vary from a few tokens to the cap).

    `steps` (learn --steps S) replaces micro * accum: each epoch's n samples are cut into exactly S
    steps whose sizes differ by at most one (the first n mod S steps take ⌈n/S⌉, the rest ⌊n/S⌋:
    10 samples, S = 3 -> 4, 3, 3), so every learn takes S steps per epoch whatever n is; accum is
    then unused. n < S cannot make S steps and is refused (n = 0 plans nothing, as without S)."""
    plan = []
    for epoch in range(epochs):
        order = list(indices)
        random.Random(seed * 1000 + epoch).shuffle(order)
        for step in _cut(order, micro * accum, steps):
            step = sorted(step, key=lambda i: lengths[i])
            plan.append((epoch, [step[j:j + micro] for j in range(0, len(step), micro)]))
    return plan


def _cut(order: list[int], size: int, steps: int | None) -> list[list[int]]:
    """One epoch's shuffled samples as optimizer steps: of `size` each (the last may be smaller), or
    exactly `steps` balanced ones."""
    if steps is None:
        return [order[start:start + size] for start in range(0, len(order), size)]
    if steps < 1:
        raise ReplayError(f"--steps must be at least 1, got {steps}")
    if 0 < len(order) < steps:
        raise ReplayError(f"--steps {steps} cuts each epoch's planned rows into {steps} optimizer steps, but this "
                          f"learn plans {len(order)} row(s): pass --steps {len(order)} or less")
    if not order:
        return []
    small, larger = divmod(len(order), steps)
    ends = [0]
    for k in range(steps):
        ends.append(ends[-1] + small + (k < larger))
    return [order[a:b] for a, b in zip(ends, ends[1:])]


def _mean(rows: list[dict], key: str) -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else 0.0


def train(model, samples, advantages, cfg, adv_metrics: dict | None = None,
          ranks: Ranks | None = None, on_step=None) -> tuple[list[dict], dict]:
    """Train `model`'s trainable (LoRA) parameters in place on `samples` with `advantages`
    (.advantage, .weight per sample); returns (learn_metrics rows, summary). on_step(row) sees each
    step's metrics row as soon as it exists (live metrics)."""
    ranks = ranks or Ranks()
    adv_metrics = adv_metrics or {}
    advantage = advantages.advantage.to(torch.float32)
    weight = advantages.weight.to(torch.float32)
    kind = getattr(advantages, "kind", None)
    # samples with zero advantage (or zero weight) contribute no gradient: never compute them. With
    # --zero-advantage keep they still fill their place in the step plan and count in the step's
    # normaliser (as in the paper's fixed global batch, TRL and verl), so objectives that zero
    # different rows take the same steps on the same data
    live = [i for i in range(len(samples)) if samples[i].completion_ids]
    active = [i for i in live if float(advantage[i]) != 0.0 and float(weight[i]) != 0.0]
    is_active = set(active)
    for i in active:
        if samples[i].prompt_ids is None:
            raise ReplayError(f"{samples[i].name} has no prompt token ids, so it cannot be scored: re-import it "
                              f"with prompt token ids or pass --recompute-old-logprobs")
    scorer = ranks.wrap(Scorer(model, check_head(model)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    device = params[0].device
    lengths = [len(s.prompt_ids or []) + len(s.completion_ids or []) for s in samples]
    # --grad-accum counts per rank: N ranks step on micro x accum x N samples, as one rank with accum x N
    planned = live if cfg.zero_advantage == "keep" else active
    # --steps S: exactly S steps per epoch, the same plan on every rank (each takes its share of a step's
    # micro-batches, as below); --grad-accum is then unused
    steps = plan_steps(planned, lengths, cfg.micro_batch_size, cfg.grad_accum * ranks.world, cfg.seed, cfg.epochs,
                       cfg.steps)
    rows: list[dict] = []
    started = time.perf_counter()
    bar_context = progress_bar(f"learn round {cfg.round} ({cfg.objective})", total=len(steps), unit="steps") \
        if ranks.is_writer else contextlib.nullcontext()
    with bar_context as bar:
        for epoch, micro_batches in steps:
            step_rows = [i for idx in micro_batches for i in idx]
            step_samples = len(step_rows)  # the normaliser: kept zero-advantage rows count here
            step_tokens = sum(len(samples[i].completion_ids) for i in step_rows)
            shares = _kind_shares(advantage, weight, kind, samples, step_rows, cfg.aggregation)
            computed = [i for i in step_rows if i in is_active]  # still sorted by length
            micro_batches = [computed[j:j + cfg.micro_batch_size] for j in range(0, len(computed), cfg.micro_batch_size)]
            passes = rank_share_of(micro_batches, ranks.rank, ranks.world)
            sums = torch.zeros(len(METRIC_KEYS) + 2, dtype=torch.float64)  # metric sums, passes, tokens
            ratio_max = 0.0
            for n, idx in enumerate(passes):
                sync = n == len(passes) - 1
                with contextlib.nullcontext() if sync or ranks.world == 1 else scorer.no_sync():
                    loss, metrics, share = _micro_step(scorer, samples, idx or micro_batches[0], advantage, weight,
                                                       cfg, step_samples, step_tokens, device)
                    # DDP averages gradients over ranks: scale up so they sum; a padding pass counts zero
                    (loss * (share * ranks.world if idx else 0.0)).backward()
                if idx:
                    sums += torch.tensor([float(loss.detach())] + [metrics[k] for k in METRIC_KEYS[1:]]
                                         + [1.0, metrics["tokens"]], dtype=torch.float64)
                    ratio_max = max(ratio_max, metrics["ratio_max"])
                del loss, metrics
                trim_freed_memory()  # the pass's activations are freed: hand their pages back
            sums, ratio_max = ranks.reduce_metrics(sums, ratio_max)
            for p in params:  # a kept step with nothing to compute: a zero gradient, as a zero loss gives
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.append(_metrics_row(cfg, len(rows), epoch, sums, ratio_max, float(grad_norm), adv_metrics, started)
                        | shares | _replay_metrics(samples, step_rows))
            if on_step is not None:
                on_step(rows[-1])
            if bar is not None:
                tokens_per_s = sum(r["tokens"] for r in rows) / max(time.perf_counter() - started, 1e-9)
                bar.advance(1, f"loss {rows[-1]['loss']:+.4f} clip {rows[-1]['clip_frac']:.2f} "
                               f"|g| {rows[-1]['grad_norm']:.3f} {tokens_per_s:.0f} tok/s")
    model.eval()
    summary = {"trained_samples": len(active), "planned_samples": len(planned), "optimizer_steps": len(rows),
               "final_loss": rows[-1]["loss"] if rows else None,
               "mean_clip_frac": _mean(rows, "clip_frac"), "seconds": time.perf_counter() - started,
               "tokens": int(sum(r["tokens"] for r in rows))}
    return rows, summary


def _kind_shares(advantage, weight, kind, samples, rows, aggregation) -> dict:
    if kind is None or not rows:
        return {f"grad_share_{name}": None for name in KIND_NAMES}
    idx = torch.tensor(rows)
    tokens = torch.tensor([len(samples[i].completion_ids) for i in rows]) if aggregation == "token-mean" else None
    shares = kind_shares(advantage[idx], weight[idx], kind[idx], tokens)
    return {f"grad_share_{name}": value for name, value in shares.items()}


def _replay_metrics(samples, rows) -> dict:
    stats = [samples[i].behaviour_stats for i in rows if samples[i].replayed]
    return replay_metrics(torch.tensor([r["sequence_weight"] for r in stats], dtype=torch.float64),
                          sum(r["weight_sum"] for r in stats), max((r["weight_max"] for r in stats), default=0.0),
                          sum(r["tokens"] for r in stats), sum(r["truncated"] for r in stats),
                          sum(r["masked"] for r in stats), torch.tensor([float(r["age"]) for r in stats]))


def _micro_step(scorer, samples, idx, advantage, weight, cfg, step_samples, step_tokens, device):
    chunk = [samples[i] for i in idx]
    batch = make_batch([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                       [s.distribution for s in chunk])
    logprobs = scorer(*(getattr(batch, f).to(device) for f in batch.__dataclass_fields__))
    old = _padded([s.old_logprobs for s in chunk], batch.targets.shape[1]).to(device)
    replayed = any(s.replayed for s in chunk)  # on-policy batches: the exact path of before
    token_weights = _padded([s.token_weights or [1.0] * len(s.completion_ids) for s in chunk],
                            batch.targets.shape[1]).to(device) if replayed else None
    shaped = torch.tensor([s.shaped for s in chunk], device=device) if replayed else None
    loss, metrics = policy_loss(
        logprobs, old, advantage[idx].to(device), batch.target_mask.to(device),
        weights=weight[idx].to(device), clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
        dual_clip=cfg.dual_clip, tis_cap=cfg.tis_cap, aggregation=cfg.aggregation,
        token_weights=token_weights, shaped=shaped, shaping_gamma=cfg.shaping_gamma)
    # each micro-batch's mean counts by its share of the step (sequences, or tokens for
    # token-mean): the step's loss is the mean over all its samples, however it is cut
    share = (float(batch.target_mask.sum()) / step_tokens if cfg.aggregation == "token-mean"
             else len(idx) / step_samples)
    return loss, metrics, share


def _metrics_row(cfg, step, epoch, sums, ratio_max, grad_norm, adv_metrics, started) -> dict:
    passes = max(float(sums[len(METRIC_KEYS)]), 1.0)
    means = {k: float(sums[i]) / passes for i, k in enumerate(METRIC_KEYS)}
    return dict(round=cfg.round, adapter_name=cfg.adapter_name, objective=cfg.objective, step=step,
                epoch=epoch, **means, ratio_max=ratio_max, grad_norm=grad_norm,
                tokens=int(sums[len(METRIC_KEYS) + 1]),
                nonzero_adv_share=float(adv_metrics.get("nonzero_adv_share", 0.0)),
                negative_group_share=float(adv_metrics.get("negative_group_share", 0.0)),
                lr=cfg.lr, seconds=time.perf_counter() - started)
