"""Selecting what `learn` trains on: whole, fully scored groups from a window of rounds.

`--where` is user SQL: it is parsed as ONE expression (duckdb.SQLExpression, never spliced into
statement text), run only on the store's confined read-only connection through the relation API,
and what it matched, (round, prompt_id) pairs, reaches the trusted selection query as data (a
registered Arrow table), with the round window as bound parameters.

Behaviour logprobs are the stored ones by default, each read against the distribution its
`logprobs_mode` and sampling settings say it is under (replay.core.sampling), or refused. With
recompute they are recomputed under the policy that sampled each row (base model + the adapter
of its `policy_round`), which is exact because every round's adapter is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb

import schemas
from replay.core.sampling import (RAW, RECOMPUTE_HINT, Distribution, UnreproducibleSampling,
                                  recompute_distribution, stored_distribution)
from replay.errors import ReplayError
from replay.sqlguard import check_read_only
from replay.store import Store

# rollout columns that say nothing about the distribution a token was drawn from; every other
# column (a sampling setting added later, say min_p) reaches the sampling rule, which refuses
# any it does not know unless it is NULL
NOT_SAMPLING = frozenset({
    "round", "prompt_id", "sample_idx", "rollout_id", "prompt_token_ids", "completion_token_ids",
    "completion_logprobs", "sum_logprob", "num_completion_tokens", "completion_text", "finish_reason",
    "policy_round", "policy_adapter", "base_model", "engine", "engine_version", "max_tokens", "seed",
    "created_at"})
RULE_ARGUMENTS = ("logprobs_mode", "temperature", "top_k", "top_p")
SAMPLING_COLUMNS = tuple(f.name for f in schemas.ROLLOUTS if f.name not in NOT_SAMPLING)

# a hint set's rows (hinted_samples) are a group of their own (`hint_set`, the set's stage name) under
# --hinted-as prompt, and left out under --hinted-as rescue (they reach learn as rescue sources)
SELECT_SQL = """
WITH in_window AS (
    SELECT s.*, h.stage AS hint_set
    FROM samples s
    LEFT JOIN hinted_samples h ON h.round = s.round AND h.prompt_id = s.prompt_id AND h.sample_idx = s.sample_idx
    WHERE s.round BETWEEN $lo AND $hi {hinted}
),
matched AS ({matched}),
complete AS (
    SELECT round, prompt_id, hint_set FROM in_window GROUP BY ALL HAVING bool_and(correct IS NOT NULL)
)
SELECT s.round, s.prompt_id, s.sample_idx, s.hint_set, s.reward, s.problem, s.completion_text,
       r.prompt_token_ids, r.completion_token_ids, r.completion_logprobs,
       r.policy_round, r.policy_adapter, {sampling}
FROM in_window s
JOIN matched m ON m.round = s.round AND m.prompt_id = s.prompt_id
JOIN complete c ON c.round = s.round AND c.prompt_id = s.prompt_id AND c.hint_set IS NOT DISTINCT FROM s.hint_set
JOIN rollouts r ON r.round = s.round AND r.prompt_id = s.prompt_id AND r.sample_idx = s.sample_idx
ORDER BY s.round, s.prompt_id, s.hint_set NULLS FIRST, s.sample_idx
"""
WITHOUT_HINTED = "AND h.stage IS NULL"
# the two fixed forms of `matched`: every group of the window, or the pairs --where matched
ALL_GROUPS = "SELECT DISTINCT round, prompt_id FROM in_window"
WHERE_GROUPS = "SELECT round, prompt_id FROM where_matched"


@dataclass
class LearnSample:
    round: int
    prompt_id: str
    sample_idx: int
    reward: float
    prompt_ids: list[int] | None
    completion_ids: list[int] | None
    old_logprobs: list[float] | None
    distribution: Distribution  # what old_logprobs are under, and what the learner scores on
    policy_round: int | None
    policy_adapter: str | None
    # a replayed row (replay.learn.rescue) joins group (round, prompt_id) from another round:
    origin: str = "group"  # group | replay | hint (a hint set's row: its own group, or replayed)
    group_tag: str | None = None  # a hint set's rows form their own group of (round, prompt_id): its stage
    behaviour_round: int | None = None  # the round the row was sampled in (None: this group's round)
    behaviour_logprobs: list[float] | None = None  # μ: its stored logprobs (old_logprobs are θ_old's)
    raw_logprobs: list[float] | None = None  # θ_old at T = 1, nothing cut: LENS's confidence of the row
    token_weights: list[float] | None = None  # the constant behaviour factor per token (None: 1)
    shaped: bool = False  # trained by policy shaping (replay.core.loss)
    behaviour_stats: dict | None = None  # per-row account for learn_metrics
    completion_text: str | None = None

    @property
    def name(self) -> str:
        return f"round {self.round} prompt {self.prompt_id} sample {self.sample_idx}"

    @property
    def group(self) -> tuple:
        return self.round, self.prompt_id, self.group_tag

    @property
    def replayed(self) -> bool:
        """Put into a negative group from elsewhere (replay.learn.rescue), not a member of its own."""
        return self.behaviour_round is not None

    @property
    def sampled_round(self) -> int:
        return self.round if self.behaviour_round is None else self.behaviour_round

    @property
    def confidence(self) -> float:
        """c = exp(mean token logprob) of the behaviour policy (1.0 for an empty completion); for a
        replayed row, of θ_old at T = 1 (not of the run that made it)."""
        values = self.old_logprobs if self.raw_logprobs is None else self.raw_logprobs
        n = len(values)
        return math.exp(sum(values) / n) if n else 1.0

    @property
    def sequence_prob(self) -> float:
        return math.exp(sum(self.old_logprobs if self.raw_logprobs is None else self.raw_logprobs))


def where_matched_groups(store: Store, where: str, lo: int, hi: int):
    """Arrow table of the (round, prompt_id) pairs in rounds lo..hi with a sample matching `where`."""
    try:
        predicate = duckdb.SQLExpression(where)
    except duckdb.Error as exc:
        raise ReplayError(f"--where {where!r} is not one SQL expression: {_first_line(exc)}") from None
    con = store.read_only_connection()
    try:
        # the same rules as `replay sql` (no SQL from strings, no settings) on the parsed expression's tree;
        # the newlines keep a trailing line comment from swallowing the closing parenthesis
        check_read_only(con, f"SELECT * FROM samples WHERE (\n{where}\n)")
        round_col = duckdb.ColumnExpression("round")
        window = (round_col >= duckdb.ConstantExpression(int(lo))) & (round_col <= duckdb.ConstantExpression(int(hi)))
        relation = con.table("samples").filter(window).filter(predicate)
        return relation.project("round, prompt_id").distinct().to_arrow_table()
    except duckdb.Error as exc:
        raise ReplayError(f"--where {where!r} failed: {_first_line(exc)}") from None
    finally:
        con.close()


def select_rows(store: Store, lo: int, hi: int, where: str | None, hinted_groups: bool = False) -> list[dict]:
    matched = where_matched_groups(store, where, lo, hi) if where else None
    sql = SELECT_SQL.format(matched=ALL_GROUPS if matched is None else WHERE_GROUPS,
                            sampling=", ".join(f"r.{c}" for c in SAMPLING_COLUMNS),
                            hinted="" if hinted_groups else WITHOUT_HINTED)
    con = store.connect()
    try:
        if matched is not None:
            con.register("where_matched", matched)
        return con.sql(sql, params={"lo": int(lo), "hi": int(hi)}).to_arrow_table().to_pylist()
    except duckdb.Error as exc:
        raise store.query_error(exc) from None
    finally:
        con.close()


def row_distribution(row: dict, recompute: bool) -> Distribution:
    settings = {c: row[c] for c in SAMPLING_COLUMNS}
    if recompute:
        return recompute_distribution(**{k: v for k, v in settings.items() if k != "logprobs_mode"})
    return stored_distribution(**settings)


def load_samples(store: Store, cfg, model_ref, device: str = "auto", dtype: str = "auto") -> tuple[list[LearnSample], dict]:
    lo, hi = cfg.round - cfg.window + 1, cfg.round
    if not getattr(cfg, "partial", False):
        refuse_half_done(store, lo, hi)
    rows = select_rows(store, lo, hi, cfg.where, hinted_groups=cfg.hinted_as == "prompt")
    from replay.read.doctor import refuse_corrupt_rows  # DuckDB reads a corrupt page as numbers: check them

    refuse_corrupt_rows(rows, store.root, getattr(model_ref, "path", None), logprobs=not cfg.recompute_old_logprobs)
    total_groups = store.query("SELECT count(DISTINCT (round, prompt_id)) AS n FROM rollouts "
                               "WHERE round BETWEEN ? AND ?", [int(lo), int(hi)]).column("n")[0].as_py()
    if not rows:
        raise ReplayError(f"no fully scored groups in rounds {lo}..{hi}"
                          + (f" matching --where {cfg.where!r}" if cfg.where else "")
                          + ": run `replay score` first")
    if not cfg.recompute_old_logprobs:
        _check_stored(rows)
    samples = []
    for r in rows:
        try:
            distribution = row_distribution(r, cfg.recompute_old_logprobs)
        except UnreproducibleSampling as exc:
            count = sum(1 for x in rows if _refused(x))
            raise ReplayError(f"{count} selected rollouts were sampled with a setting the learner cannot "
                              f"reproduce, so their stored logprobs give no exact importance ratio (e.g. "
                              f"round {r['round']} prompt {r['prompt_id']} sample {r['sample_idx']}: {exc}): "
                              f"{RECOMPUTE_HINT}") from None
        samples.append(LearnSample(r["round"], r["prompt_id"], r["sample_idx"], float(r["reward"]),
                                   r["prompt_token_ids"], r["completion_token_ids"], r["completion_logprobs"],
                                   distribution, r["policy_round"], r["policy_adapter"],
                                   origin="hint" if r["hint_set"] else "group", group_tag=r["hint_set"]))
    if not cfg.recompute_old_logprobs:
        refuse_unknown_sampling(rows)
    if cfg.recompute_old_logprobs:
        _tokenize_text_rows(samples, rows, model_ref)
        recompute_old_logprobs(samples, model_ref, cfg.micro_batch_size, device, dtype)
    groups = len({s.group for s in samples})
    selection = {"rounds": [lo, hi], "where": cfg.where, "groups": groups, "samples": len(samples),
                 "groups_skipped": total_groups - groups,
                 "old_logprobs": "recomputed" if cfg.recompute_old_logprobs else "stored"}
    return samples, selection


COVERAGE_SQL = """
SELECT r.round, count(*) AS n, count(v.vr) AS scored
FROM rollouts r
LEFT JOIN (SELECT DISTINCT round AS vr, prompt_id AS vp, sample_idx AS vs FROM verdicts WHERE round BETWEEN ? AND ?) v
       ON v.vr = r.round AND v.vp = r.prompt_id AND v.vs = r.sample_idx
WHERE r.round BETWEEN ? AND ?
GROUP BY r.round ORDER BY r.round
"""


def refuse_half_done(store: Store, lo: int, hi: int) -> None:
    """Learn trains on whole rounds: refuse while a round of the window has rollouts without a verdict, or
    is still being written or scored (a stage holds its lock), or a manifest says a generate, import or
    score of it did not finish (a shard without one included), naming what and how to go on. `--partial`
    trains on the fully scored groups instead."""
    from replay.locks import lock_holder, unfinished_stages

    problems = []
    for row in store.query(COVERAGE_SQL, [int(lo), int(hi), int(lo), int(hi)]).to_pylist():
        r, why = row["round"], []
        if row["scored"] < row["n"]:
            why.append(f"{row['n'] - row['scored']} of its {row['n']} rollouts have no verdict")
        why += [f"{holder} is writing its {table}" for table in ("rollouts", "verdicts")
                if (holder := lock_holder(store.root, r, table))]
        why += [f"{stage} did not finish" for stage in unfinished_stages(store.root, r, ("generate", "import", "score"))]
        if why:
            problems.append(f"round {r}: {', '.join(why)}")
    if problems:
        raise ReplayError(f"{'; '.join(problems)}: learn would train on part of the round; finish it (`replay "
                          f"score --round R`, every shard), or pass --partial to train on the fully scored groups")


def refuse_unknown_sampling(rows: list[dict]) -> None:
    """Stored logprobs of unknown sampling (an import without --temperature) are under a distribution
    nobody recorded: reading them as T = 1, nothing cut, gives a wrong ratio whenever they were not."""
    unknown = [r for r in rows if r.get("logprobs_mode") == "unknown" and r["completion_logprobs"] is not None]
    if unknown:
        r = unknown[0]
        raise ReplayError(f"{len(unknown)} selected rollouts carry logprobs of unknown sampling (logprobs_mode "
                          f"'unknown': imported without --temperature; e.g. round {r['round']} prompt "
                          f"{r['prompt_id']} sample {r['sample_idx']}): pass --recompute-old-logprobs to "
                          f"recompute them, or re-import them with the --temperature/--top-p/--top-k they were "
                          f"sampled at")


def _refused(row: dict) -> bool:
    try:
        row_distribution(row, recompute=False)
        return False
    except UnreproducibleSampling:
        return True


def _check_stored(rows: list[dict]) -> None:
    missing = [r for r in rows if r["completion_logprobs"] is None or r["completion_token_ids"] is None]
    if missing:
        r = missing[0]
        raise ReplayError(f"{len(missing)} selected rollouts have no stored token ids/logprobs (e.g. round "
                          f"{r['round']} prompt {r['prompt_id']} sample {r['sample_idx']}, imported text): "
                          f"pass --recompute-old-logprobs to recompute them with the base model")
    no_prompt = [r for r in rows if r["prompt_token_ids"] is None]
    if no_prompt:
        r = no_prompt[0]
        raise ReplayError(f"{len(no_prompt)} selected rollouts have completion token ids but no prompt token "
                          f"ids (e.g. round {r['round']} prompt {r['prompt_id']} sample {r['sample_idx']}, an "
                          f"import): re-import them with prompt token ids, or pass --recompute-old-logprobs "
                          f"to tokenize their prompts")


def _tokenize_text_rows(samples: list[LearnSample], rows: list[dict], model_ref) -> None:
    """Imported rows may lack token ids: tokenize the prompt (chat template) when it has none, and
    the completion text only when it has no token ids either (given ids are kept)."""
    from replay.models import load_tokenizer
    from replay.prompting import chat_prompt_ids

    tokenizer = None
    for sample, row in zip(samples, rows):
        if sample.completion_ids is not None and sample.prompt_ids is not None:
            continue
        tokenizer = tokenizer or load_tokenizer(model_ref)
        if sample.prompt_ids is None:
            sample.prompt_ids = chat_prompt_ids(tokenizer, row["problem"] or "")
        if sample.completion_ids is None:
            sample.completion_ids = list(tokenizer(row["completion_text"], add_special_tokens=False)["input_ids"])


def recompute_old_logprobs(samples: list[LearnSample], model_ref, micro_batch_size: int,
                           device: str = "auto", dtype: str = "auto") -> None:
    """π_old of each sample under the policy that sampled it, with the training code path."""
    _score_under_own_policy(samples, model_ref, micro_batch_size, device, dtype, raw=False)


def add_raw_logprobs(samples: list[LearnSample], model_ref, micro_batch_size: int,
                     device: str = "auto", dtype: str = "auto") -> int:
    """LENS's confidence is the model's own probability of the answer, p(y|x)^(1/|y|) at T = 1 with
    nothing cut (arXiv 2510.08696 §3), not the sampling distribution's, which temperature < 1 and
    top-k/top-p inflate: rows sampled under another distribution get their policy's raw logprobs
    (rows at T = 1, nothing cut, already hold them). Returns how many rows were scored."""
    todo = [s for s in samples if s.raw_logprobs is None and s.distribution != RAW and s.completion_ids]
    _score_under_own_policy(todo, model_ref, micro_batch_size, device, dtype, raw=True)
    return len(todo)


def _score_under_own_policy(samples: list[LearnSample], model_ref, micro_batch_size: int, device: str, dtype: str,
                            raw: bool) -> None:
    """Each sample's token logprobs under the policy that sampled it (base + its policy_adapter), on
    its own distribution (old_logprobs) or at T = 1 with nothing cut (raw_logprobs)."""
    import torch

    from replay.adapters import local_copy

    from .policy import frozen_policy, make_batch, token_logprobs

    by_adapter: dict[str | None, list[LearnSample]] = {}
    for s in samples:
        by_adapter.setdefault(s.policy_adapter, []).append(s)
    for adapter, group in by_adapter.items():
        model = frozen_policy(model_ref, local_copy(adapter), device=device, dtype=dtype)  # S3: fetched once
        with torch.no_grad():
            for start in range(0, len(group), micro_batch_size):
                chunk = group[start:start + micro_batch_size]
                batch = make_batch([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk],
                                   [RAW if raw else s.distribution for s in chunk])
                values = token_logprobs(model, batch).float().cpu()
                for i, s in enumerate(chunk):
                    setattr(s, "raw_logprobs" if raw else "old_logprobs", values[i, : len(s.completion_ids)].tolist())
        del model


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split("\n")[:2]).strip()

