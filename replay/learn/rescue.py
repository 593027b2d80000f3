"""Replay rescue (`learn --rescue replay`): stored correct rollouts of a prompt join its negative groups.

For each negative group of the trained rounds, up to `--rescue-max` rows of the `rescue_candidates`
view (by default newest policy first, then rollout id; `--rescue-sql` narrows them by a guarded
user query returning rollout ids) join the group as completions of the group's own prompt. The
group's advantages are then computed over all its members, as for any mixed group.

A replayed row was sampled by an older policy μ. Its θ_old logprobs are recomputed under the
round's starting adapter (the policy the on-policy rows of the round came from), on the group's
prompt and the row's own sampling distribution, so that its PPO ratio is π_θ/π_θold like every
other row's; π_θold/μ, with μ the row's stored logprobs, becomes its behaviour factor
(replay.core.behaviour). LENS's confidence of a replayed row is π_θold's at T = 1 with nothing
cut, so it does not depend on the sampling settings of the run that made the row.
"""

from __future__ import annotations

import duckdb

from replay.core.sampling import RAW, UnreproducibleSampling, recompute_distribution
from replay.errors import ReplayError
from replay.store import Store

from .selection import SAMPLING_COLUMNS, LearnSample, row_distribution

PICK_SQL = """
WITH picked AS (
    SELECT c.*, row_number() OVER (PARTITION BY c.round, c.prompt_id
                                   ORDER BY c.policy_round DESC NULLS LAST, c.rollout_id) AS rank
    FROM rescue_candidates c
    JOIN negative_groups_here n ON n.round = c.round AND n.prompt_id = c.prompt_id
    {user}
)
SELECT p.round AS group_round, p.prompt_id, p.rollout_round, p.sample_idx, p.rollout_id, p.source, v.reward,
       r.prompt_token_ids, r.completion_token_ids, r.completion_logprobs, r.completion_text,
       r.policy_round, r.policy_adapter, {sampling}
FROM picked p
JOIN rollouts r ON r.round = p.rollout_round AND r.prompt_id = p.prompt_id AND r.sample_idx = p.sample_idx
JOIN samples v ON v.round = p.rollout_round AND v.prompt_id = p.prompt_id AND v.sample_idx = p.sample_idx
WHERE p.rank <= $k
ORDER BY p.round, p.prompt_id, p.rank
"""
USER_PICK = "WHERE c.rollout_id IN (SELECT rollout_id FROM user_pick)"


def negative_groups(samples: list[LearnSample]) -> list[tuple[int, str]]:
    """(round, prompt_id) of the groups in `samples` whose every member is wrong."""
    right: dict[tuple[int, str], bool] = {}
    for s in samples:
        if s.group_tag is not None:  # a hint set's own group (--hinted-as prompt) is not rescued
            continue
        key = (s.round, s.prompt_id)
        right[key] = right.get(key, False) or s.reward > 0
    return sorted(key for key, any_right in right.items() if not any_right)


def user_pick(store: Store, sql: str):
    """The rollout ids the user's `--rescue-sql` returns (through the guard of `replay sql`)."""
    result = store.read_only_query(sql)
    names = result.column_names
    if "rollout_id" not in names:
        raise ReplayError(f"--rescue-sql: the query must return a rollout_id column (it returns "
                          f"{', '.join(names)})")
    import pyarrow as pa

    ids = sorted({str(v) for v in result.column("rollout_id").to_pylist() if v is not None})
    return pa.table({"rollout_id": pa.array(ids, pa.string())})


def pick_rows(store: Store, groups: list[tuple[int, str]], k: int, rescue_sql: str | None) -> list[dict]:
    """The replayed rows: up to k candidates per group, with what the learner needs of each."""
    import pyarrow as pa

    if not groups:
        return []
    picked = user_pick(store, rescue_sql) if rescue_sql else None
    con = store.connect()
    try:
        con.register("negative_groups_here", pa.table({"round": pa.array([g[0] for g in groups], pa.int32()),
                                                       "prompt_id": pa.array([g[1] for g in groups], pa.string())}))
        if picked is not None:
            con.register("user_pick", picked)
        sql = PICK_SQL.format(user=USER_PICK if picked is not None else "",
                              sampling=", ".join(f"r.{c}" for c in SAMPLING_COLUMNS))
        return con.sql(sql, params={"k": int(k)}).to_arrow_table().to_pylist()
    except duckdb.Error as exc:
        raise store.query_error(exc) from None
    finally:
        con.close()


def replayed_samples(rows: list[dict], group_prompts: dict[tuple[int, str], list[int]], mode: str) -> list[LearnSample]:
    """LearnSamples of the picked rows, trained as completions of their group's prompt. Rows whose
    behaviour logprobs cannot be read exactly are refused, unless `mode` is shaping (no μ needed)."""
    out = []
    for r in rows:
        where = (f"round {r['rollout_round']} prompt {r['prompt_id']} sample {r['sample_idx']}, replayed into "
                 f"round {r['group_round']}")
        try:
            if r["logprobs_mode"] == "unknown":  # as for a group's own rows (refuse_unknown_sampling)
                raise UnreproducibleSampling("logprobs_mode", "unknown", "imported without its sampling settings")
            distribution = row_distribution(r, recompute=False)
            if r["completion_logprobs"] is None or r["completion_token_ids"] is None:
                raise UnreproducibleSampling("completion_logprobs", None, "no stored token ids and logprobs")
        except UnreproducibleSampling as exc:
            if mode != "shaping":
                raise ReplayError(f"cannot replay {where}: its behaviour logprobs are not reproducible ({exc}); "
                                  f"pass --behaviour-correction shaping to train such rows with LUFFY's policy "
                                  f"shaping, or exclude them with --rescue-sql") from None
            distribution = recompute_distribution(**{c: r[c] for c in SAMPLING_COLUMNS if c != "logprobs_mode"})
        out.append(LearnSample(int(r["group_round"]), r["prompt_id"], int(r["sample_idx"]), float(r["reward"]),
                               list(group_prompts[(r["group_round"], r["prompt_id"])]), r["completion_token_ids"],
                               None, distribution, r["policy_round"], r["policy_adapter"],
                               origin="hint" if r["source"] == "hint" else "replay",
                               behaviour_round=int(r["rollout_round"]),
                               behaviour_logprobs=r["completion_logprobs"], completion_text=r["completion_text"]))
    return out


def attach_behaviour(samples: list[LearnSample], start_policy, mode: str, cap: float, micro_batch_size: int) -> None:
    """θ_old logprobs (on each row's distribution, and at T = 1 for LENS's confidence) under the
    round's starting policy, and the behaviour factors of `mode`, for replayed samples (in place)."""
    import torch

    from replay.core.behaviour import behaviour_weights

    from .policy import make_batch, token_logprobs

    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        prompts, completions = [s.prompt_ids for s in chunk], [s.completion_ids for s in chunk]
        with torch.no_grad():
            old = token_logprobs(start_policy, make_batch(prompts, completions, [s.distribution for s in chunk]))
            raw = old if all(s.distribution == RAW for s in chunk) else \
                token_logprobs(start_policy, make_batch(prompts, completions, [RAW] * len(chunk)))
        old, raw = old.double().cpu(), raw.double().cpu()
        mask = make_batch(prompts, completions).target_mask
        behaviour = torch.zeros_like(old)
        for i, s in enumerate(chunk):
            if s.behaviour_logprobs is not None and mode != "shaping":
                behaviour[i, : len(s.completion_ids)] = torch.tensor(s.behaviour_logprobs, dtype=torch.float64)
        weights = behaviour_weights(old, behaviour, mask, "none" if mode == "shaping" else mode, cap)
        for i, s in enumerate(chunk):
            n = len(s.completion_ids)
            s.old_logprobs = old[i, :n].tolist()
            s.raw_logprobs = raw[i, :n].tolist()
            s.token_weights = weights.factor[i, :n].tolist()
            s.shaped = mode == "shaping"
            s.behaviour_stats = {"sequence_weight": float(weights.sequence_weight[i]),
                                 "weight_sum": float(weights.weight[i, :n].sum()),
                                 "weight_max": float(weights.weight[i, :n].max()) if n else 0.0,
                                 "tokens": n, "truncated": int(weights.truncated[i]),
                                 "masked": bool(weights.masked[i]), "age": s.round - s.behaviour_round}


def add_replayed(store: Store, cfg, samples: list[LearnSample], start_adapter, model_ref, device: str,
                 dtype: str) -> tuple[list[LearnSample], dict]:
    """`samples` plus the replayed rows of their negative groups (in group order), and an account."""
    groups = negative_groups(samples)
    prompts = {(s.round, s.prompt_id): s.prompt_ids for s in samples if s.group_tag is None}  # the plain prompt
    rows = pick_rows(store, groups, cfg.rescue_max, cfg.rescue_sql)
    replayed = replayed_samples(rows, prompts, cfg.behaviour_correction)
    if replayed:
        _tokenize_completions(replayed, model_ref)
        from replay.adapters import local_copy

        from .policy import frozen_policy

        start_policy = frozen_policy(model_ref, local_copy(start_adapter), device=device, dtype=dtype)
        attach_behaviour(replayed, start_policy, cfg.behaviour_correction, cfg.behaviour_cap, cfg.micro_batch_size)
        del start_policy
    by_group: dict[tuple[int, str], list[LearnSample]] = {}
    for s in replayed:
        by_group.setdefault((s.round, s.prompt_id), []).append(s)
    merged = []
    for i, s in enumerate(samples):  # groups are contiguous: each one's replayed rows follow its own
        merged.append(s)
        if i + 1 == len(samples) or samples[i + 1].group != s.group:
            merged.extend(by_group.get(s.group[:2], []) if s.group_tag is None else [])
    account = {"rescue": cfg.rescue, "negative_groups": len(groups), "rescued_groups": len(by_group),
               "replayed": len(replayed), "behaviour_correction": cfg.behaviour_correction,
               "start_adapter": str(start_adapter) if start_adapter else None, "rescue_sql": cfg.rescue_sql}
    return merged, account


def _tokenize_completions(samples: list[LearnSample], model_ref) -> None:
    """Imported text-only rows (shaping only) get the completion tokens of the store's tokenizer."""
    missing = [s for s in samples if s.completion_ids is None]
    if missing:
        from replay.models import load_tokenizer

        tokenizer = load_tokenizer(model_ref)
        for s in missing:
            s.completion_ids = list(tokenizer(s.completion_text or "", add_special_tokens=False)["input_ids"])
