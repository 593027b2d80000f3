"""Canned read-only reports over the store's views (`replay inspect`, `replay status`)."""

from __future__ import annotations

import pyarrow as pa

from .errors import ReplayError
from .store import Store

STAGES = ("generate", "score", "learn")
INSPECT_REPORTS = ("rounds", "negatives", "mistakes", "prompt")


def _round_filter(round: int | None) -> str:
    return "" if round is None else f"WHERE round = {int(round)}"


def inspect_report(store: Store, what: str, ident: str | None = None, round: int | None = None,
                   limit: int = 20) -> tuple[str, pa.Table]:
    """(title, rows) of one canned report."""
    if what == "rounds":
        return "rounds", store.read_only_query("SELECT * FROM rounds")
    if what == "negatives":
        sql = (f"SELECT round, prompt_id, level, n, mean_confidence, gold_answer, problem FROM negative_groups "
               f"{_round_filter(round)} ORDER BY round DESC, mean_confidence DESC LIMIT {int(limit)}")
        return "negative groups (all samples wrong), most confident first", store.read_only_query(sql)
    if what == "mistakes":
        sql = (f"SELECT round, prompt_id, sample_idx, confidence, gold_answer, extracted_answer, completion_text "
               f"FROM confident_mistakes {_round_filter(round)} LIMIT {int(limit)}")
        return "wrong answers ranked by confidence", store.read_only_query(sql)
    if what == "prompt":
        if not ident:
            raise ReplayError("`replay inspect prompt` needs a prompt id (see `replay inspect negatives`)")
        sql = ("SELECT round, sample_idx, correct, status, confidence, extracted_answer, gold_answer, "
               "completion_text FROM samples WHERE prompt_id = ? ORDER BY round, sample_idx")
        rows = store.read_only_query(sql, params=[ident])
        if rows.num_rows == 0:
            raise ReplayError(f"no rollouts for prompt {ident!r} in {store.root}")
        problem = store.read_only_query("SELECT any_value(problem) AS p FROM samples WHERE prompt_id = ?",
                                        params=[ident])
        return f"prompt {ident}: {problem.column('p')[0].as_py()}", rows
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


def status_table(store: Store) -> pa.Table:
    """Per round: which stages have a completion manifest, and the row counts."""
    counts = {}
    for table in ("rollouts", "verdicts", "learn_audit"):
        result = store.query(f"SELECT round, count(*) AS n FROM {table} GROUP BY round")
        counts[table] = dict(zip(result.column("round").to_pylist(), result.column("n").to_pylist()))
    rows = []
    for round in store.rounds():
        row = {"round": round}
        for stage in STAGES:
            row[stage] = stage_status(store, round, stage)
        row["rollouts"] = counts["rollouts"].get(round, 0)
        row["verdicts"] = counts["verdicts"].get(round, 0)
        row["learn_rows"] = counts["learn_audit"].get(round, 0)
        row["adapter"] = "yes" if (store.adapter_dir(round) / "adapter_config.json").exists() else "-"
        rows.append(row)
    names = ["round", *STAGES, "rollouts", "verdicts", "learn_rows", "adapter"]
    return pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names})
