"""Selecting what `learn` trains on: whole, fully scored groups from a window of rounds.

Behaviour logprobs are the stored ones by default; with recompute they are recomputed under the
policy that sampled each row (base model + the adapter of its `policy_round`), which is exact
because every round's adapter is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ReplayError
from .store import Store

SELECT_SQL = """
WITH in_window AS (
    SELECT * FROM samples WHERE round BETWEEN $lo AND $hi
),
matched AS (SELECT DISTINCT round, prompt_id FROM in_window WHERE ({where})),
complete AS (
    SELECT round, prompt_id FROM in_window GROUP BY round, prompt_id HAVING bool_and(correct IS NOT NULL)
)
SELECT s.round, s.prompt_id, s.sample_idx, s.reward, s.problem, s.completion_text,
       r.prompt_token_ids, r.completion_token_ids, r.completion_logprobs, r.temperature,
       r.policy_round, r.policy_adapter, r.logprobs_mode
FROM in_window s
JOIN matched m ON m.round = s.round AND m.prompt_id = s.prompt_id
JOIN complete c ON c.round = s.round AND c.prompt_id = s.prompt_id
JOIN rollouts r ON r.round = s.round AND r.prompt_id = s.prompt_id AND r.sample_idx = s.sample_idx
ORDER BY s.round, s.prompt_id, s.sample_idx
"""


@dataclass
class LearnSample:
    round: int
    prompt_id: str
    sample_idx: int
    reward: float
    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]
    temperature: float
    policy_round: int | None
    policy_adapter: str | None

    @property
    def confidence(self) -> float:
        """c = exp(mean token logprob) of the behaviour policy (1.0 for an empty completion)."""
        n = len(self.old_logprobs)
        return math.exp(sum(self.old_logprobs) / n) if n else 1.0

    @property
    def sequence_prob(self) -> float:
        return math.exp(sum(self.old_logprobs))


def _check_where(store: Store, where: str | None) -> str:
    if not where:
        return "true"
    # the predicate must be one read-only expression: run it through the user-SQL guard first
    store.read_only_query(f"SELECT count(*) FROM samples WHERE ({where})")
    return where


def load_samples(store: Store, cfg, model_ref) -> tuple[list[LearnSample], dict]:
    lo, hi = cfg.round - cfg.window + 1, cfg.round
    where = _check_where(store, cfg.where)
    rows = store.query(SELECT_SQL.format(where=where).replace("$lo", str(int(lo))).replace("$hi", str(int(hi))))
    rows = rows.to_pylist()
    total_groups = store.query(f"SELECT count(DISTINCT (round, prompt_id)) AS n FROM rollouts "
                               f"WHERE round BETWEEN {int(lo)} AND {int(hi)}").column("n")[0].as_py()
    if not rows:
        raise ReplayError(f"no fully scored groups in rounds {lo}..{hi}"
                          + (f" matching --where {cfg.where!r}" if cfg.where else "")
                          + ": run `replay score` first")
    missing = [r for r in rows if r["completion_logprobs"] is None or r["completion_token_ids"] is None]
    if missing and not cfg.recompute_old_logprobs:
        r = missing[0]
        raise ReplayError(f"{len(missing)} selected rollouts have no stored token ids/logprobs (e.g. round "
                          f"{r['round']} prompt {r['prompt_id']} sample {r['sample_idx']}, imported text): "
                          f"pass --recompute-old-logprobs to recompute them with the base model")
    samples = [LearnSample(r["round"], r["prompt_id"], r["sample_idx"], float(r["reward"]),
                           r["prompt_token_ids"], r["completion_token_ids"], r["completion_logprobs"],
                           float(r["temperature"] or 1.0), r["policy_round"], r["policy_adapter"]) for r in rows]
    if cfg.recompute_old_logprobs:
        _tokenize_text_rows(samples, rows, model_ref)
        recompute_old_logprobs(samples, model_ref, cfg.micro_batch_size)
    groups = len({(s.round, s.prompt_id) for s in samples})
    selection = {"rounds": [lo, hi], "where": cfg.where, "groups": groups, "samples": len(samples),
                 "groups_skipped": total_groups - groups,
                 "old_logprobs": "recomputed" if cfg.recompute_old_logprobs else "stored"}
    return samples, selection


def _tokenize_text_rows(samples: list[LearnSample], rows: list[dict], model_ref) -> None:
    """Imported rows carry text only: tokenize prompt (chat template) and completion."""
    from .models import load_tokenizer
    from .prompting import chat_prompt_ids

    tokenizer = None
    for sample, row in zip(samples, rows):
        if sample.completion_ids is not None and sample.prompt_ids is not None:
            continue
        tokenizer = tokenizer or load_tokenizer(model_ref)
        sample.prompt_ids = chat_prompt_ids(tokenizer, row["problem"] or "")
        sample.completion_ids = list(tokenizer(row["completion_text"], add_special_tokens=False)["input_ids"])


def recompute_old_logprobs(samples: list[LearnSample], model_ref, micro_batch_size: int) -> None:
    """π_old of each sample under the policy that sampled it, with the training code path."""
    import torch

    from .learner import frozen_policy, make_batch, token_logprobs

    by_adapter: dict[str | None, list[LearnSample]] = {}
    for s in samples:
        by_adapter.setdefault(s.policy_adapter, []).append(s)
    for adapter, group in by_adapter.items():
        model = frozen_policy(model_ref.path, adapter)
        with torch.no_grad():
            for start in range(0, len(group), micro_batch_size):
                chunk = group[start:start + micro_batch_size]
                batch = make_batch([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                   [s.temperature for s in chunk])
                values = token_logprobs(model, batch)
                for i, s in enumerate(chunk):
                    s.old_logprobs = values[i, : len(s.completion_ids)].tolist()
        del model
