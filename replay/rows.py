"""Rows of the prompts and rollouts tables, built in one place for `generate` and `import`: they pass
what they know; derived columns (rollout_id, sum_logprob, num_completion_tokens) are computed here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict

from . import keys
from .locks import table_lock
from .store import Store, utc_now


def rollout_row(round: int, prompt_id: str, sample_idx: int, *, prompt_token_ids: Sequence[int] | None,
                completion_token_ids: Sequence[int] | None, completion_logprobs: Sequence[float] | None,
                completion_text: str, finish_reason: str, base_model: str, engine: str, engine_version: str,
                logprobs_mode: str, created_at: dt.datetime, policy_round: int | None = None,
                policy_adapter: str | None = None, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, max_tokens: int | None = None, seed: int | None = None) -> dict:
    """One row of the rollouts table. Sampling settings and seed are None for rows made elsewhere."""
    return dict(
        round=round, prompt_id=prompt_id, sample_idx=sample_idx,
        rollout_id=keys.rollout_id(round, prompt_id, sample_idx),
        prompt_token_ids=prompt_token_ids, completion_token_ids=completion_token_ids,
        completion_logprobs=completion_logprobs,
        sum_logprob=None if completion_logprobs is None else float(sum(completion_logprobs)),
        num_completion_tokens=None if completion_token_ids is None else len(completion_token_ids),
        completion_text=completion_text, finish_reason=finish_reason, policy_round=policy_round,
        policy_adapter=policy_adapter, base_model=base_model, engine=engine, engine_version=engine_version,
        logprobs_mode=logprobs_mode, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
        seed=seed, created_at=created_at)


def register_prompts(store: Store, prompts: list) -> int:
    """Add the prompts (replay.datasets.Prompt) the table lacks; returns how many were new."""
    with table_lock(store.root, "prompts"):  # prompts are not per round: writers of any round meet here
        known = set(store.query("SELECT DISTINCT prompt_id FROM prompts").column("prompt_id").to_pylist())
        new = [dict(asdict(p), created_at=utc_now()) for p in prompts if p.prompt_id not in known]
        store.write("prompts", new)
    return len(new)
