"""Canned read-only reports over the store's views (`replay inspect`, `replay status`)."""

from __future__ import annotations

import duckdb

from schemas import STAGES

from .. import adapters
from ..errors import ReplayError
from .formats import Rows
from ..store import Store

INSPECT_REPORTS = ("rounds", "negatives", "mistakes", "prompt", "rescuable", "rescue", "hints")

# per round: negative groups, and how many of them the store holds a correct rollout for, by source
# and age ('any': by any source); what `learn --rescue replay` could put into them
RESCUABLE_SQL = """
WITH negative AS (SELECT round, count(*) AS negative_groups FROM negative_groups GROUP BY round),
by_source AS (
    SELECT round, source, CAST(age AS VARCHAR) AS age, count(DISTINCT prompt_id) AS rescuable_groups,
           count(*) AS candidates
    FROM rescue_candidates GROUP BY round, source, age
    UNION ALL
    SELECT round, 'any', 'any', count(DISTINCT prompt_id), count(*) FROM rescue_candidates GROUP BY round
)
SELECT n.round, n.negative_groups, coalesce(b.source, 'any') AS source, coalesce(b.age, 'any') AS age,
       coalesce(b.rescuable_groups, 0) AS rescuable_groups, coalesce(b.candidates, 0) AS candidates
FROM negative n LEFT JOIN by_source b ON b.round = n.round
{where} ORDER BY n.round, source = 'any' DESC, source, age
"""
# per learn round and adapter: the groups rescued by replay, and how the next round's samples of that
# prompt (sampled by the adapter this learn made) fared
RESCUE_SQL = """
WITH rescued AS (
    SELECT round, adapter_name, rollout_round, prompt_id, count(*) AS replayed,
           min(behaviour_round) AS oldest_replayed_round
    FROM learn_audit WHERE origin = 'replay' GROUP BY ALL
)
SELECT r.round, r.adapter_name, r.rollout_round AS group_round, r.prompt_id, r.replayed, r.oldest_replayed_round,
       count(s.sample_idx) AS next_round_n, count(*) FILTER (WHERE s.correct) AS next_round_correct
FROM rescued r
LEFT JOIN samples s ON s.round = r.round + 1 AND s.prompt_id = r.prompt_id AND s.correct IS NOT NULL
{where} GROUP BY ALL ORDER BY r.round DESC, r.adapter_name, r.prompt_id LIMIT {limit}
"""



def _round_filter(round: int | None) -> str:
    return "" if round is None else f"WHERE round = {int(round)}"


def inspect_report(store: Store, what: str, ident: str | None = None, round: int | None = None,
                   limit: int = 20) -> tuple[str, Rows]:
    """(title, rows) of one canned report."""
    def query(sql: str, params: list | None = None) -> Rows:
        return store.read_only_query(sql, params=params, fetch=Rows.of)

    if what == "rounds":
        return "rounds", query("SELECT * FROM rounds")
    if what == "negatives":
        sql = (f"SELECT round, prompt_id, level, n, mean_confidence, gold_answer, problem FROM negative_groups "
               f"{_round_filter(round)} ORDER BY round DESC, mean_confidence DESC LIMIT {int(limit)}")
        return "negative groups (all samples wrong), most confident first", query(sql)
    if what == "mistakes":
        sql = (f"SELECT round, prompt_id, sample_idx, confidence, gold_answer, extracted_answer, completion_text "
               f"FROM confident_mistakes {_round_filter(round)} LIMIT {int(limit)}")
        return "wrong answers ranked by confidence", query(sql)
    if what == "prompt":
        if not ident:
            raise ReplayError("`replay inspect prompt` needs a prompt id (see `replay inspect negatives`)")
        sql = ("SELECT round, sample_idx, correct, status, confidence, extracted_answer, gold_answer, "
               "completion_text FROM samples WHERE prompt_id = ? ORDER BY round, sample_idx")
        rows = query(sql, [ident])
        if rows.num_rows == 0:
            raise ReplayError(f"no rollouts for prompt {ident!r} in {store.root}")
        problem = query("SELECT any_value(problem) AS p FROM samples WHERE prompt_id = ?", [ident])
        return f"prompt {ident}: {problem.rows[0][0]}", rows
    if what == "rescuable":
        where = "" if round is None else f"WHERE n.round = {int(round)}"
        return "negative groups the store holds a correct rollout for (learn --rescue replay)", \
            query(RESCUABLE_SQL.format(where=where))
    if what == "rescue":
        where = "" if round is None else f"WHERE r.round = {int(round)}"
        return "groups rescued by replay, and the next round's samples of their prompts", \
            query(RESCUE_SQL.format(where=where, limit=int(limit)))
    if what == "hints":
        return "hint sets: prompts tried, solved with the hint, solved without it in the next round", \
            query(f"SELECT * FROM hint_outcomes {_round_filter(round)}")
    raise ReplayError(f"unknown report {what!r}; choose from {', '.join(INSPECT_REPORTS)}")


def stage_status(store: Store, round: int, stage: str) -> str:
    """A stage's manifest status; for a stage run as --shard i/n workers, how many shards completed."""
    manifest = store.read_manifest(round, stage)
    if manifest:
        return manifest["status"]
    shards = sorted(store.manifest_path(round, stage).parent.glob(f"{stage}.shard-*-of-*.json"))
    if not shards:
        return "-"
    count = int(shards[0].stem.rsplit("-of-", 1)[1])
    done = sum(1 for path in shards if (store.read_manifest(round, path.stem) or {}).get("status") == "complete")
    return f"complete ({count} shards)" if done == count else f"{done}/{count} shards complete"


def status_table(store: Store) -> Rows:
    """Per round: which stages have a completion manifest, and the row counts."""
    tables = ("rollouts", "verdicts", "learn_audit")
    con = store.connect(names=tables)  # one connection, binding only these three
    try:
        counts = {table: dict(con.execute(f"SELECT round, count(*) FROM {table} GROUP BY round").fetchall())
                  for table in tables}
    except duckdb.Error as exc:  # a damaged part, a round=abc directory: one line naming it
        raise store.query_error(exc) from None
    finally:
        con.close()
    rows = []
    for round in store.rounds():
        row = {"round": round}
        for stage in STAGES:
            row[stage] = stage_status(store, round, stage)
        row["rollouts"] = counts["rollouts"].get(round, 0)
        row["verdicts"] = counts["verdicts"].get(round, 0)
        row["learn_rows"] = counts["learn_audit"].get(round, 0)
        row["adapter"] = "yes" if adapters.exists(store.adapter_dir(round)) else "-"
        rows.append(row)
    names = ["round", *STAGES, "rollouts", "verdicts", "learn_rows", "adapter"]
    return Rows.from_pylist(rows, names)
