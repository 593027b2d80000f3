"""`replay export`: scored rollouts for other tools.

- `trl`: one JSON object per rollout in TRL's `rollout_func` contract — `prompt_ids`,
  `completion_ids`, `logprobs` (per completion token) — plus `reward` and the keys.
- `jsonl`: one JSON object per rollout with prompt, completion text, verdict and confidence.
(`adapter` and `merged` write a directory: replay/read/export_model.py.)
The file is JSON Lines; `trl` to a `.parquet` path writes the same columns as Parquet. An output name
that says another format (`jsonl` to `.parquet`, either to `.csv`/`.json`/`.md`) is refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ReplayError
from ..store import Store
from .formats import EXTENSIONS, output_target, write_result

FORMATS = ("trl", "jsonl")

_SQL = {
    "trl": """SELECT s.round, s.prompt_id, s.sample_idx, r.prompt_token_ids AS prompt_ids,
                     r.completion_token_ids AS completion_ids, r.completion_logprobs AS logprobs,
                     s.reward, s.correct
              FROM samples s JOIN rollouts r USING (round, prompt_id, sample_idx)
              WHERE s.correct IS NOT NULL {and_round}
              ORDER BY s.round, s.prompt_id, s.sample_idx""",
    "jsonl": """SELECT round, prompt_id, sample_idx, problem, gold_answer, completion_text, finish_reason,
                       num_completion_tokens, confidence, correct, reward, status, extracted_answer, policy_round
                FROM samples {where_round} ORDER BY round, prompt_id, sample_idx""",
}


def run(store_path: str, fmt: str, out: str, round: int | None = None) -> int:
    if fmt not in FORMATS:
        raise ReplayError(f"unknown --format {fmt!r}; use trl, jsonl, adapter or merged")
    store = Store.open(store_path)
    if out != "-":
        store.refuse_inside(out, "--out")
    container = _container(fmt, out)
    output_target(out)  # refuse a directory or a missing one before the query runs
    cond = "" if round is None else f"round = {int(round)}"
    sql = _SQL[fmt].format(and_round=f"AND s.{cond}" if cond else "", where_round=f"WHERE {cond}" if cond else "")
    table = store.query(sql)
    if fmt == "trl":
        missing = table.column("logprobs").null_count
        if missing:
            raise ReplayError(f"{missing} rollouts have no token ids/logprobs (imported text): "
                              f"use --format jsonl for them")
    write_result(table, container, out)
    return table.num_rows


def _container(fmt: str, out: str) -> str:
    """JSON Lines, or Parquet for `trl` to a `.parquet` name; a name of any other format is refused."""
    named = None if out == "-" else EXTENSIONS.get(Path(out).suffix.lower())
    if named in (None, "jsonl"):  # `-`, .jsonl, or a name that says no format (out.txt)
        return "jsonl"
    if named == "parquet" and fmt == "trl":
        return "parquet"
    allowed = "JSON Lines (*.jsonl) or Parquet (*.parquet)" if fmt == "trl" else "JSON Lines (*.jsonl)"
    raise ReplayError(f"refused: {out} names a {named} file, but export --format {fmt} writes {allowed}")
