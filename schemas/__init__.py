"""Arrow schemas of every table in a replay store, and the schema version.

Column names listed in DESIGN §3 are a public contract: other tools and scripts rely on them.
Every table except `prompts` is partitioned by round: the `round` column lives in the directory
name (`<table>/round=R/part-*.parquet`, Hive style) and is dropped from the file itself, so that
DuckDB, pyarrow, Spark and Trino all see it exactly once.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import NamedTuple

SCHEMA_VERSION = 1


class Column(NamedTuple):
    name: str
    type: str  # a key of DUCKDB_TYPES
    nullable: bool


# Column types by name, so that `import schemas` needs no pyarrow: the CLI's read commands open a
# store without it (pyarrow and numpy are 0.15 s of a 0.3 s start-up budget). Arrow schemas are
# built on first use (`TABLES`, `arrow_type`).
DUCKDB_TYPES = {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "float32": "FLOAT",
                "float64": "DOUBLE", "bool": "BOOLEAN", "timestamp": "TIMESTAMPTZ",
                "list<int32>": "INTEGER[]", "list<float32>": "FLOAT[]", "list<string>": "VARCHAR[]"}


def arrow_type(name: str):
    import pyarrow as pa

    if name.startswith("list<"):
        return pa.list_(arrow_type(name[5:-1]))
    if name == "timestamp":
        return pa.timestamp("us", tz="UTC")
    return {"string": pa.string, "bool": pa.bool_}.get(name, getattr(pa, name, None))()


def _schema(*fields: tuple) -> tuple[Column, ...]:
    return tuple(Column(*field) for field in fields)


PROMPTS = _schema(
    ("prompt_id", "string", False),  # stable hash of (source, problem)
    ("source", "string", False),  # dataset name: "arith", a file name, ...
    ("split", "string", False),
    ("problem", "string", False),
    ("answer", "string", False),  # gold answer as given to the verifier
    ("level", "int32", True),
    ("subject", "string", True),
    ("unique_id", "string", True),
    ("created_at", "timestamp", False),
    # a worked reference solution: arith's steps, GSM8K's and MATH's own (each boxes the gold answer),
    # or the input's `solution` column; NULL where there is none and in files written before the column
    ("solution", "string", True),
)

ROLLOUTS = _schema(
    ("round", "int32", False),
    ("prompt_id", "string", False),
    ("sample_idx", "int32", False),
    ("rollout_id", "string", False),  # hashlib of (round, prompt_id, sample_idx)
    ("prompt_token_ids", "list<int32>", True),  # NULL for imported text-only rows
    ("completion_token_ids", "list<int32>", True),
    ("completion_logprobs", "list<float32>", True),  # logprob of each sampled token
    ("sum_logprob", "float64", True),
    ("num_completion_tokens", "int32", True),
    ("completion_text", "string", False),
    ("finish_reason", "string", False),  # stop | length | unknown (imported)
    ("policy_round", "int32", True),  # round of the adapter that sampled it; NULL = base model
    ("policy_adapter", "string", True),  # path of that adapter
    ("base_model", "string", False),
    ("engine", "string", False),
    ("engine_version", "string", False),
    ("logprobs_mode", "string", False),  # processed | raw | none
    ("temperature", "float32", True),
    ("top_p", "float32", True),
    ("top_k", "int32", True),
    ("max_tokens", "int32", True),
    ("seed", "int64", True),
    ("created_at", "timestamp", False),
)

VERDICTS = _schema(
    ("round", "int32", False),
    ("prompt_id", "string", False),
    ("sample_idx", "int32", False),
    ("rollout_id", "string", False),
    ("correct", "bool", False),
    ("reward", "float32", False),
    ("status", "string", False),  # ok | no_answer | gold_unparseable | timeout | error
    ("extracted_answer", "string", True),
    ("error", "string", True),
    ("verifier", "string", False),
    ("verifier_version", "string", False),
    ("latency_ms", "float32", False),
    ("scored_at", "timestamp", False),
)

LEARN_AUDIT = _schema(
    ("round", "int32", False),  # the learn round
    ("adapter_name", "string", False),
    ("prompt_id", "string", False),
    ("sample_idx", "int32", False),
    ("rollout_round", "int32", False),
    ("objective", "string", False),
    ("confidence", "float64", False),
    ("shaped_reward", "float64", False),
    ("advantage", "float64", False),  # before any group weight
    ("weight", "float64", False),  # group loss weight: alpha for LENS negative groups, else 1
    ("group_kind", "string", False),  # negative | mixed | positive
    ("num_tokens", "int32", False),
    # group: a member of its own group | replay: a stored success put into a negative group of
    # round `rollout_round`, sampled in `behaviour_round` (NULL in older stores)
    ("origin", "string", True),
    ("behaviour_round", "int32", True),  # the round the row was sampled in (= rollout_round for group rows)
)

LEARN_METRICS = _schema(
    ("round", "int32", False),
    ("adapter_name", "string", False),
    ("objective", "string", False),
    ("step", "int32", False),
    ("epoch", "int32", False),
    ("loss", "float64", False),
    ("clip_frac", "float64", False),
    ("dual_clip_frac", "float64", False),
    ("ratio_mean", "float64", False),
    ("ratio_max", "float64", False),
    ("grad_norm", "float64", False),
    ("tokens", "int64", False),
    ("nonzero_adv_share", "float64", False),
    ("negative_group_share", "float64", False),
    ("lr", "float64", False),
    # seconds since the learn started, at the end of this step (a running total; one step's time is
    # seconds - lag(seconds) OVER (PARTITION BY round, adapter_name ORDER BY step))
    ("seconds", "float64", False),
    # share of the step's Σ|w·A| (per token for token-mean) from each group kind; NULL in older stores
    ("grad_share_negative", "float64", True),
    ("grad_share_mixed", "float64", True),
    ("grad_share_positive", "float64", True),
    # the step's replayed rows (learn --rescue replay; replay.core.behaviour.replay_metrics): their
    # count, mean age in rounds, behaviour weight π_θold/μ per token (mean, max, share truncated
    # at C), share of rows masked, Kish's effective sample size; NULL without replayed rows
    ("replayed_rows", "int64", True),
    ("replay_mean_age", "float64", True),
    ("behaviour_weight_mean", "float64", True),
    ("behaviour_weight_max", "float64", True),
    ("behaviour_truncated_share", "float64", True),
    ("behaviour_masked_share", "float64", True),
    ("replay_ess", "float64", True),
)

EVAL = _schema(
    ("round", "int32", False),  # round whose policy was evaluated; -1 = base model
    ("adapter_name", "string", False),
    ("dataset", "string", False),
    ("group_by", "string", False),  # all | level | subject
    ("group_value", "string", False),
    ("k", "int32", False),
    ("pass_at_k", "float64", False),
    ("n_prompts", "int32", False),
    ("n_samples", "int32", False),
    ("created_at", "timestamp", False),
)

# Per round x prompt, what the failure-group views need, written by `replay score` so that they need
# not re-read every rollout and verdict (views/group_summary_raw.sql computes it; replay/summary.py).
# The file is named by a fingerprint of the round's rollout and verdict files it was computed from;
# a summary whose files have changed since is not read (the views aggregate that round's rows).
GROUP_SUMMARY = _schema(
    ("round", "int32", False),
    ("prompt_id", "string", False),
    ("rollouts", "int64", False),  # rollouts of the group, scored or not
    ("sum_tokens", "int64", True),  # sum of num_completion_tokens ...
    ("n_tokens", "int64", False),  # ... over this many rollouts (the others have no count)
    ("policy_round", "int32", True),  # newest policy that sampled the group
    ("n", "int64", False),  # scored rollouts (newest verdict each)
    ("n_correct", "int64", False),
    ("pass_rate", "float64", True),  # NULL while n = 0
    ("mean_confidence", "float64", True),
    ("mean_wrong_confidence", "float64", True),
    ("kind", "string", True),  # negative | mixed | positive; NULL while n = 0
)

PROMPT_SETS = _schema(  # prompt sets chosen by SQL (`--prompts`), named by a hash of their ids
    ("prompt_set_id", "string", False),
    ("sql", "string", False),
    ("n_prompts", "int32", False),
    ("prompt_ids", "list<string>", False),
    ("created_at", "timestamp", False),
)

COLUMNS: dict[str, tuple[Column, ...]] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "verdicts": VERDICTS,
    "learn_audit": LEARN_AUDIT,
    "learn_metrics": LEARN_METRICS,
    "eval": EVAL,
    "prompt_sets": PROMPT_SETS,
    "group_summary": GROUP_SUMMARY,
}

# Tables stored under <table>/round=R/; the rest are flat <table>/part-*.parquet.
PARTITIONED = frozenset({"rollouts", "verdicts", "learn_audit", "learn_metrics", "eval", "group_summary"})

# Small tables that gained (nullable) columns within this schema version: read by column name, so
# files written before a column existed show it as NULL.
GROWN = frozenset({"learn_metrics", "learn_audit", "prompts"})

# Tables whose files cache a view: the store registers the view (current files only), not the files.
CACHES = frozenset({"group_summary"})

# Each table's natural key: no two rows share one (`replay doctor` reports any that do). A re-score
# adds verdicts of a new verifier version only; an eval run adds rows stamped with its own time.
# (group_summary is a cache: doctor checks it against the rows instead.)
KEYS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt_id",),
    "rollouts": ("round", "prompt_id", "sample_idx"),
    "verdicts": ("round", "prompt_id", "sample_idx", "verifier_version"),
    "learn_audit": ("round", "adapter_name", "rollout_round", "prompt_id", "sample_idx", "behaviour_round"),
    "learn_metrics": ("round", "adapter_name", "step"),
    "eval": ("round", "adapter_name", "dataset", "group_by", "group_value", "k", "created_at"),
    "prompt_sets": ("prompt_set_id",),
}

# -- facts the code, the manifests and the adapter layout share -----------------------------------
BASE_ROUND = -1  # the `round` of eval rows for the base model (no adapter)
STAGES = ("generate", "score", "learn")  # a round's stages, in order: manifests/round=R/<stage>.json
MAIN_ADAPTER = "main"  # the adapter each round continues; any other name is a side adapter (A/B)


def learn_stage(adapter_name: str) -> str:
    """The learn manifest's stage name: `learn` for the main adapter, `learn.NAME` for a side one."""
    return "learn" if adapter_name == MAIN_ADAPTER else f"learn.{adapter_name}"


def adapter_of_learn_stage(stage: str) -> str:
    """The inverse of learn_stage."""
    return stage.split(".", 1)[1] if "." in stage else MAIN_ADAPTER


# Keys every stage manifest (<store>/manifests/round=R/<stage>.json) must carry.
MANIFEST_KEYS = ("stage", "round", "status", "started_at", "finished_at", "config", "counts", "versions")

# Derived views, created in this order after the base table views.
VIEW_FILES = (
    "unique_prompts",
    "samples",
    "hinted_samples",
    "group_summary_raw",
    "group_summary",  # in CACHES: the store builds it (current summary files, else group_summary_raw)
    "groups",
    "negative_groups",
    "confident_mistakes",
    "rescues",
    "rounds",
    "eval_passk",
    "rescue_eval",
    "rescue_candidates",
    "hint_outcomes",
)


def view_sql(name: str) -> str:
    return resources.files(__name__).joinpath("views", f"{name}.sql").read_text(encoding="utf-8")


NAMES = frozenset({*COLUMNS, *VIEW_FILES, "stage_runs", "sample_plans"})  # every table and view of a connection


def references(sql: str) -> set[str]:
    """The store's tables and views that `sql` may read: every word that is one of their names
    (a superset: a word in a string or a comment counts too)."""
    return {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", sql)} & NAMES


@functools.cache
def dependencies() -> dict[str, frozenset[str]]:
    """view -> the tables and views its SQL reads, i.e. names after FROM or JOIN (the view files
    join no other way; group_summary: see Store.connect)."""
    def reads(sql: str) -> frozenset[str]:
        words = re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][A-Za-z0-9_]*)", re.sub(r"--[^\n]*", "", sql), re.I)
        return frozenset(w.lower() for w in words) & NAMES

    deps = {view: reads(view_sql(view)) - {view} for view in VIEW_FILES if view not in CACHES}
    return deps | {"group_summary": frozenset({"group_summary_raw"})}


def needed(names: set[str], deps: dict[str, frozenset[str]]) -> set[str]:
    """`names` and everything they read, transitively."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(deps.get(name, ()))
    return found


def arrow_schema(table: str):
    """The pyarrow schema of a table (built once)."""
    if table not in _ARROW:
        import pyarrow as pa

        _ARROW[table] = pa.schema([pa.field(c.name, arrow_type(c.type), nullable=c.nullable)
                                   for c in COLUMNS[table]])
    return _ARROW[table]


_ARROW: dict = {}


def __getattr__(name: str):
    # `schemas.TABLES`: table name -> pyarrow schema, built (and pyarrow imported) on first use
    if name == "TABLES":
        return {table: arrow_schema(table) for table in COLUMNS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
