"""`replay learn`: train the round's LoRA adapter on stored, scored rollouts.

Top to bottom: select whole scored groups with DuckDB -> advantages (pure core) -> PPO-style
clipped updates against the behaviour logprobs -> adapter (atomic rename), audit rows, step
metrics, manifest. By default training continues from the previous round's adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from replay.errors import ReplayError
from replay.learn_data import LearnSample, load_samples
from replay.manifests import finish_manifest, start_manifest
from replay.metrics_sink import check_report_to, open_sink
from replay.progress import note
from replay.store import Store

OBJECTIVES = ("grpo", "lens", "nsr", "psr", "w_reinforce")


@dataclass
class LearnConfig:
    round: int = 0
    objective: str = "lens"
    adapter_name: str = "main"
    window: int = 1  # train on rounds [round-window+1, round]
    where: str | None = None  # SQL predicate over the `samples` view; a group is kept if any sample matches
    recompute_old_logprobs: bool = False
    init_from_previous: bool = True  # continue round-1's adapter when it exists
    model: str | None = None  # default: the store's base model
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lr: float = 1e-5
    epochs: int = 1
    micro_batch_size: int = 4
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = 3.0
    tis_cap: float | None = None
    aggregation: str = "seq-mean-token-mean"
    lens_alpha: float = 0.25
    lens_d_imp: str = "confidence"
    lens_inv_group_size: bool = True
    w_reinforce_lambda: float = 0.1
    gradient_checkpointing: bool = False
    seed: int = 0
    force: bool = False
    report_to: str = "none"  # live metrics: none | tensorboard | wandb (replay.metrics_sink)
    extra: dict = field(default_factory=dict)


def advantage_options(cfg: LearnConfig) -> dict:
    if cfg.objective == "lens":
        return {"alpha": cfg.lens_alpha, "d_imp_mode": cfg.lens_d_imp, "inv_group_size": cfg.lens_inv_group_size}
    if cfg.objective == "w_reinforce":
        return {"positive": cfg.w_reinforce_lambda}
    return {}


def compute_advantages(cfg: LearnConfig, samples: list[LearnSample]):
    import torch

    from replay.core.advantages import KIND_NAMES, compute_advantages as core_advantages

    group_index: dict[tuple, int] = {}
    gids = [group_index.setdefault((s.round, s.prompt_id), len(group_index)) for s in samples]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    confidence = torch.tensor([s.confidence for s in samples], dtype=torch.float64)
    options = advantage_options(cfg)
    if cfg.objective == "lens" and cfg.lens_d_imp == "sequence":
        options["sequence_prob"] = torch.tensor([s.sequence_prob for s in samples], dtype=torch.float64)
    result, metrics = core_advantages(cfg.objective, rewards, torch.tensor(gids), confidence, **options)
    kinds = [KIND_NAMES[int(k)] for k in result.kind]
    return result, kinds, metrics


def audit_rows(cfg: LearnConfig, samples, result, kinds) -> list[dict]:
    return [dict(round=cfg.round, adapter_name=cfg.adapter_name, prompt_id=s.prompt_id, sample_idx=s.sample_idx,
                 rollout_round=s.round, objective=cfg.objective, confidence=float(s.confidence),
                 shaped_reward=float(result.shaped_reward[i]), advantage=float(result.advantage[i]),
                 weight=float(result.weight[i]), group_kind=kinds[i], num_tokens=len(s.completion_ids))
            for i, s in enumerate(samples)]


def run(store_path: str, cfg: LearnConfig) -> dict:
    if cfg.objective not in OBJECTIVES:
        raise ReplayError(f"unknown --objective {cfg.objective!r}; choose from {', '.join(OBJECTIVES)}")
    if cfg.epochs < 1 or cfg.micro_batch_size < 1 or cfg.grad_accum < 1 or cfg.window < 1:
        raise ReplayError("--epochs, --micro-batch-size, --grad-accum and --window must be at least 1")
    check_report_to(cfg.report_to)
    store = Store.open(store_path)
    stage = "learn" if cfg.adapter_name == "main" else f"learn.{cfg.adapter_name}"
    out_dir = store.adapter_dir(cfg.round, cfg.adapter_name)
    done = store.read_manifest(cfg.round, stage)
    if done and done.get("status") == "complete" and (out_dir / "adapter_config.json").exists() and not cfg.force:
        return done | {"skipped": True}

    import torch

    from replay import adapters
    from replay.models import resolve_model
    from replay.runtime import configure_torch, return_freed_memory

    configure_torch()
    return_freed_memory()
    torch.manual_seed(cfg.seed)
    model_ref = resolve_model(cfg.model or store.meta.get("base_model") or "smollm2-135m")
    record = start_manifest(stage, cfg.round, asdict(cfg))
    samples, selection = load_samples(store, cfg, model_ref)
    result, kinds, adv_metrics = compute_advantages(cfg, samples)
    init = adapters.previous_adapter(store, cfg.round, cfg.adapter_name) if cfg.init_from_previous else None

    from replay.train_loop import train

    note(f"learn round {cfg.round} ({cfg.objective})", f"{len(samples)} samples in {selection['groups']} groups; "
                                                     f"loading the model")
    sink = open_sink(cfg.report_to, store.root, f"learn-{cfg.adapter_name}-r{cfg.round}", asdict(cfg))
    try:
        metrics_rows, train_summary, model = train(cfg, model_ref, init, samples, result, adv_metrics,
                                                   on_step=lambda row: sink.log(row["step"], row))
    finally:
        sink.close()
    adapters.save(model, out_dir, {"round": cfg.round, "objective": cfg.objective, "adapter_name": cfg.adapter_name,
                                   "base_model": model_ref.name, "init_adapter": str(init) if init else None,
                                   "config": asdict(cfg), "selection": selection, "metrics": train_summary})
    # fixed part names: a rerun after a crash (or --force) replaces them instead of adding duplicates
    store.write("learn_audit", audit_rows(cfg, samples, result, kinds), round=cfg.round, name=cfg.adapter_name)
    store.write("learn_metrics", metrics_rows, round=cfg.round, name=cfg.adapter_name)
    counts = {"samples": len(samples), "groups": selection["groups"], "trained_samples": train_summary["trained_samples"],
              "optimizer_steps": len(metrics_rows)}
    record = finish_manifest(record, counts, selection=selection, metrics=train_summary | adv_metrics,
                             adapter=str(out_dir), init_adapter=str(init) if init else None,
                             old_logprobs=selection["old_logprobs"])
    store.write_manifest(cfg.round, stage, record)
    return record


