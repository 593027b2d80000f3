"""Arrow schemas of every table in a replay store, and the schema version.

Column names listed in DESIGN §3 are a public contract: other tools and scripts rely on them.
Every table except `prompts` is partitioned by round: the `round` column lives in the directory
name (`<table>/round=R/part-*.parquet`, Hive style) and is dropped from the file itself, so that
DuckDB, pyarrow, Spark and Trino all see it exactly once.
"""

from __future__ import annotations

from importlib import resources

import pyarrow as pa

SCHEMA_VERSION = 1

_ts = pa.timestamp("us", tz="UTC")
_ids = pa.list_(pa.int32())


def _schema(*fields: tuple) -> pa.Schema:
    return pa.schema([pa.field(name, typ, nullable=nullable) for name, typ, nullable in fields])


PROMPTS = _schema(
    ("prompt_id", pa.string(), False),  # stable hash of (source, problem)
    ("source", pa.string(), False),  # dataset name: "arith", a file name, ...
    ("split", pa.string(), False),
    ("problem", pa.string(), False),
    ("answer", pa.string(), False),  # gold answer as given to the verifier
    ("level", pa.int32(), True),
    ("subject", pa.string(), True),
    ("unique_id", pa.string(), True),
    ("created_at", _ts, False),
)

ROLLOUTS = _schema(
    ("round", pa.int32(), False),
    ("prompt_id", pa.string(), False),
    ("sample_idx", pa.int32(), False),
    ("rollout_id", pa.string(), False),  # hashlib of (round, prompt_id, sample_idx)
    ("prompt_token_ids", _ids, True),  # NULL for imported text-only rows
    ("completion_token_ids", _ids, True),
    ("completion_logprobs", pa.list_(pa.float32()), True),  # logprob of each sampled token
    ("sum_logprob", pa.float64(), True),
    ("num_completion_tokens", pa.int32(), True),
    ("completion_text", pa.string(), False),
    ("finish_reason", pa.string(), False),  # stop | length | unknown (imported)
    ("policy_round", pa.int32(), True),  # round of the adapter that sampled it; NULL = base model
    ("policy_adapter", pa.string(), True),  # path of that adapter
    ("base_model", pa.string(), False),
    ("engine", pa.string(), False),
    ("engine_version", pa.string(), False),
    ("logprobs_mode", pa.string(), False),  # processed | raw | none
    ("temperature", pa.float32(), True),
    ("top_p", pa.float32(), True),
    ("top_k", pa.int32(), True),
    ("max_tokens", pa.int32(), True),
    ("seed", pa.int64(), True),
    ("created_at", _ts, False),
)

VERDICTS = _schema(
    ("round", pa.int32(), False),
    ("prompt_id", pa.string(), False),
    ("sample_idx", pa.int32(), False),
    ("rollout_id", pa.string(), False),
    ("correct", pa.bool_(), False),
    ("reward", pa.float32(), False),
    ("status", pa.string(), False),  # ok | no_answer | gold_unparseable | timeout | error
    ("extracted_answer", pa.string(), True),
    ("error", pa.string(), True),
    ("verifier", pa.string(), False),
    ("verifier_version", pa.string(), False),
    ("latency_ms", pa.float32(), False),
    ("scored_at", _ts, False),
)

LEARN_AUDIT = _schema(
    ("round", pa.int32(), False),  # the learn round
    ("adapter_name", pa.string(), False),
    ("prompt_id", pa.string(), False),
    ("sample_idx", pa.int32(), False),
    ("rollout_round", pa.int32(), False),
    ("objective", pa.string(), False),
    ("confidence", pa.float64(), False),
    ("shaped_reward", pa.float64(), False),
    ("advantage", pa.float64(), False),  # before any group weight
    ("weight", pa.float64(), False),  # group loss weight: alpha for LENS negative groups, else 1
    ("group_kind", pa.string(), False),  # negative | mixed | positive
    ("num_tokens", pa.int32(), False),
)

LEARN_METRICS = _schema(
    ("round", pa.int32(), False),
    ("adapter_name", pa.string(), False),
    ("objective", pa.string(), False),
    ("step", pa.int32(), False),
    ("epoch", pa.int32(), False),
    ("loss", pa.float64(), False),
    ("clip_frac", pa.float64(), False),
    ("dual_clip_frac", pa.float64(), False),
    ("ratio_mean", pa.float64(), False),
    ("ratio_max", pa.float64(), False),
    ("grad_norm", pa.float64(), False),
    ("tokens", pa.int64(), False),
    ("nonzero_adv_share", pa.float64(), False),
    ("negative_group_share", pa.float64(), False),
    ("lr", pa.float64(), False),
    # seconds since the learn started, at the end of this step (a running total; one step's time is
    # seconds - lag(seconds) OVER (PARTITION BY round, adapter_name ORDER BY step))
    ("seconds", pa.float64(), False),
)

EVAL = _schema(
    ("round", pa.int32(), False),  # round whose policy was evaluated; -1 = base model
    ("adapter_name", pa.string(), False),
    ("dataset", pa.string(), False),
    ("group_by", pa.string(), False),  # all | level | subject
    ("group_value", pa.string(), False),
    ("k", pa.int32(), False),
    ("pass_at_k", pa.float64(), False),
    ("n_prompts", pa.int32(), False),
    ("n_samples", pa.int32(), False),
    ("created_at", _ts, False),
)

TABLES: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "verdicts": VERDICTS,
    "learn_audit": LEARN_AUDIT,
    "learn_metrics": LEARN_METRICS,
    "eval": EVAL,
}

# Tables stored under <table>/round=R/; the rest are flat <table>/part-*.parquet.
PARTITIONED = frozenset({"rollouts", "verdicts", "learn_audit", "learn_metrics", "eval"})

# Keys every stage manifest (<store>/manifests/round=R/<stage>.json) must carry.
MANIFEST_KEYS = ("stage", "round", "status", "started_at", "finished_at", "config", "counts", "versions")

# Derived views, created in this order after the base table views.
VIEW_FILES = (
    "samples",
    "groups",
    "negative_groups",
    "confident_mistakes",
    "rescues",
    "rounds",
    "eval_passk",
)


def view_sql(name: str) -> str:
    return resources.files(__name__).joinpath("views", f"{name}.sql").read_text(encoding="utf-8")
