"""`replay learn`: train the round's LoRA adapter on stored, scored rollouts.

Top to bottom: select whole scored groups with DuckDB -> advantages (pure core) -> PPO-style
clipped updates against the behaviour logprobs -> adapter (atomic rename), audit rows, step
metrics, manifest. By default training continues from the previous round's adapter.
"""

from __future__ import annotations

from dataclasses import asdict

from schemas import learn_stage

from replay import adapters
from replay.learn.config import LearnConfig
from replay.learn.rescue import add_replayed
from replay.learn.selection import LearnSample, add_raw_logprobs, load_samples
from replay.locks import locked_stage
from replay.manifests import finish_manifest, start_manifest
from replay.metrics_sink import check_report_to, open_sink
from replay.progress import note
from replay.store import Store

__all__ = ["LearnConfig", "run"]


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
    gids = [group_index.setdefault(s.group, len(group_index)) for s in samples]
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
                 weight=float(result.weight[i]), group_kind=kinds[i], num_tokens=len(s.completion_ids),
                 origin=s.origin, behaviour_round=s.sampled_round)
            for i, s in enumerate(samples)]


@locked_stage(lambda cfg: f"learn.{cfg.adapter_name}", "learn")
def run(store_path: str, cfg: LearnConfig) -> dict:
    cfg.validate()
    check_report_to(cfg.report_to)
    store = Store.open(store_path)
    stage = learn_stage(cfg.adapter_name)
    out_dir = store.adapter_dir(cfg.round, cfg.adapter_name)
    done = store.read_manifest(cfg.round, stage)
    if done and done.get("status") == "complete" and adapters.exists(out_dir) and not cfg.force:
        return done | {"skipped": True}

    from replay.runtime import configure_torch, return_freed_memory

    return_freed_memory()  # first: torch reads THP_MEM_ALLOC_ENABLE at its first allocation

    import torch

    from replay.learn import distributed
    from replay.learn.loop import train
    from replay.learn.policy import LoraSettings, load_policy
    from replay.models import pick_device, resolve_model

    configure_torch()
    torch.manual_seed(cfg.seed)
    ranks, device = distributed.init(cfg.device)
    try:
        device = pick_device(device)  # a missing GPU fails here, before any work
        model_ref = resolve_model(cfg.model or store.meta.get("base_model") or "smollm2-135m")
        record = start_manifest(stage, cfg.round, asdict(cfg) | {"world_size": ranks.world})
        # every rank selects the same rows and computes the same advantages (same seeded plan)
        samples, selection = load_samples(store, cfg, model_ref, device=device, dtype=cfg.dtype)
        init = adapters.previous_adapter(store, cfg.round, cfg.adapter_name) if cfg.init_from_previous else None
        if cfg.rescue == "replay":  # θ_old of replayed rows is the policy this learn starts from
            samples, selection["rescue"] = add_replayed(store, cfg, samples, init, model_ref, device, cfg.dtype)
        if cfg.objective == "lens":  # c is the policy's own p(y|x), whatever the rows were sampled with
            selection["raw_confidence_rows"] = add_raw_logprobs(samples, model_ref, cfg.micro_batch_size, device,
                                                                cfg.dtype)
        result, kinds, adv_metrics = compute_advantages(cfg, samples)
        note(f"learn round {cfg.round} ({cfg.objective})", f"{len(samples)} samples in {selection['groups']} "
                                                         f"groups; loading the model")
        lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.target_modules))
        local_init = adapters.local_copy(init)  # peft loads from a local directory; S3 adapters are fetched
        model = load_policy(model_ref, local_init, lora, cfg.gradient_checkpointing, device=device, dtype=cfg.dtype)
        sink = open_sink(cfg.report_to, store.root, f"learn-{cfg.adapter_name}-r{cfg.round}", asdict(cfg)) \
            if ranks.is_writer else open_sink("none", store.root, "", {})
        try:
            metrics_rows, train_summary = train(model, samples, result, cfg, adv_metrics, ranks,
                                                on_step=lambda row: sink.log(row["step"], row))
        finally:
            sink.close()
        if ranks.is_writer:  # one writer; the others wait at the barrier below
            adapters.save(model, out_dir, {"round": cfg.round, "objective": cfg.objective,
                                           "adapter_name": cfg.adapter_name, "base_model": model_ref.name,
                                           "init_adapter": str(init) if init else None, "config": asdict(cfg),
                                           "selection": selection, "metrics": train_summary})
            # fixed part names: a rerun after a crash (or --force) replaces them instead of adding duplicates
            store.write("learn_audit", audit_rows(cfg, samples, result, kinds), round=cfg.round, name=cfg.adapter_name)
            store.write("learn_metrics", metrics_rows, round=cfg.round, name=cfg.adapter_name)
            counts = {"samples": len(samples), "groups": selection["groups"],
                      "replayed": sum(s.replayed for s in samples),
                      "trained_samples": train_summary["trained_samples"], "optimizer_steps": len(metrics_rows)}
            record = finish_manifest(record, counts, selection=selection, metrics=train_summary | adv_metrics,
                                     adapter=str(out_dir), init_adapter=str(init) if init else None,
                                     old_logprobs=selection["old_logprobs"], device=device,
                                     dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
            store.write_manifest(cfg.round, stage, record)
        ranks.barrier()
        return record if ranks.is_writer else {"rank": ranks.rank}
    finally:
        distributed.shutdown()
