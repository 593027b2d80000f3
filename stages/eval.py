"""`replay eval`: pass@k of a round's policy on held-out prompts, reusing generate and score.

Eval samples live in a store of their own under `<store>/evals/<adapter>-r<R>/` (`base/`), so `learn`
never trains on them; the pass@k rows go to the main store's `eval` table (view `eval_passk`).
Round R evaluates base + the adapter learned in round R; round -1 is the base model. Every
adapter sees the same prompts and the same per-sample seeds (common random numbers), so
differences between adapters are not sampling noise of the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from replay import adapters
from replay.core.passk import default_ks, mean_pass_at_k
from replay.errors import ReplayError
from replay.metrics_sink import check_report_to, log_once
from replay.prompt_sets import record_prompt_set, select_prompt_set
from replay.store import Store, utc_now
from schemas import BASE_ROUND, MAIN_ADAPTER
from stages import generate, score


@dataclass
class EvalConfig:
    round: int = BASE_ROUND
    adapter_name: str = MAIN_ADAPTER
    generate: generate.GenerateConfig = None  # dataset, split, num_prompts, num_samples, ...
    workers: int | None = None
    timeout: float = 10.0
    report_to: str = "none"  # live metrics (replay.metrics_sink): pass@k at step = round


def eval_store_path(store: Store, round: int, adapter_name: str, prompt_set_id: str | None = None) -> Path:
    # no "round=" directory here: DuckDB's Hive parsing would read it as the rows' round
    name = "base" if round == BASE_ROUND else f"{adapter_name}-r{round}"
    return store.root / "evals" / (f"{name}-{prompt_set_id}" if prompt_set_id else name)


def passk_rows(groups: list[dict], round: int, adapter_name: str, dataset: str, n_samples: int) -> list[dict]:
    """pass@k overall and per level / subject from per-prompt (n, c) counts."""
    ks = default_ks(n_samples)
    now = utc_now()
    slices: dict[tuple[str, str], list[dict]] = {("all", "all"): groups}
    for key in ("level", "subject"):
        for g in groups:
            if g[key] is not None:
                slices.setdefault((key, str(g[key])), []).append(g)
    rows = []
    for (group_by, value), members in sorted(slices.items()):
        n = np.array([m["n"] for m in members])
        c = np.array([m["n_correct"] for m in members])
        for k, p in mean_pass_at_k(n, c, ks).items():
            rows.append(dict(round=round, adapter_name=adapter_name, dataset=dataset, group_by=group_by,
                             group_value=value, k=k, pass_at_k=p, n_prompts=len(members), n_samples=n_samples,
                             created_at=now))
    return rows


def run(store_path: str, cfg: EvalConfig) -> list[dict]:
    check_report_to(cfg.report_to)
    store = Store.open(store_path)
    if cfg.round == BASE_ROUND:
        adapter = "none"
    else:
        path = store.adapter_dir(cfg.round, cfg.adapter_name)
        if not adapters.exists(path):
            raise ReplayError(f"no adapter {cfg.adapter_name!r} for round {cfg.round} at {path}: "
                              f"run `replay learn --round {cfg.round}` first (or --base for the base model)")
        adapter = str(path)
    base_model = store.meta.get("base_model") or cfg.generate.model
    prompt_set = select_prompt_set(store, cfg.generate.prompts) if cfg.generate.prompts else None
    if prompt_set:
        record_prompt_set(store, prompt_set)
    sub = eval_store_path(store, cfg.round, cfg.adapter_name, prompt_set and prompt_set.prompt_set_id)
    # round 0 inside the eval store for every policy: the same seeds for every adapter
    gen_cfg = replace(cfg.generate, round=0, adapter=adapter, model=base_model, stage="eval-generate",
                      prompts_from=str(store.root) if prompt_set else None)
    generate.run(str(sub), gen_cfg)
    score.run(str(sub), score.ScoreConfig(round=0, workers=cfg.workers, timeout=cfg.timeout, stage="eval-score"))
    groups = Store.open(sub).query("SELECT prompt_id, n, n_correct, level, subject FROM groups").to_pylist()
    label = f"prompts:{prompt_set.prompt_set_id}" if prompt_set else _dataset_label(cfg.generate)
    rows = passk_rows(groups, cfg.round, cfg.adapter_name if cfg.round != BASE_ROUND else "base", label,
                      cfg.generate.num_samples)
    store.write("eval", rows, round=cfg.round)
    # the base model is run eval-base at step 0 (steps count rounds; dashboards want them >= 0)
    log_once(cfg.report_to, store.root, f"eval-{rows[0]['adapter_name']}", max(cfg.round, 0), passk_metrics(rows))
    return rows


def passk_metrics(rows: list[dict]) -> dict[str, float]:
    """pass@k overall as `pass@k`, per slice as `level=3/pass@k`."""
    return {("" if r["group_by"] == "all" else f"{r['group_by']}={r['group_value']}/") + f"pass@{r['k']}":
            r["pass_at_k"] for r in rows}


def _dataset_label(g: generate.GenerateConfig) -> str:
    name = g.dataset if g.dataset == "arith" else Path(g.dataset).stem
    return f"{name}:{g.split}:{g.num_prompts or 'all'}"
