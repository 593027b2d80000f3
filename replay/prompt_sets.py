"""Prompt sets chosen by SQL: `--prompts "select prompt_id from negative_groups where round = 0"`.

The query runs through the same guard as `replay sql` (one read-only query on the confined
connection). A set is named by a hash of its sorted prompt ids, so the same prompts give the same
id whatever the SQL's spelling; the SQL is kept beside it in the `prompt_sets` table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .datasets import Prompt
from .errors import ReplayError
from .store import Store, utc_now


@dataclass(frozen=True)
class PromptSet:
    sql: str
    prompt_set_id: str  # "ps-" + 12 hex digits of sha256 over the sorted ids
    prompts: tuple[Prompt, ...]  # sorted by prompt_id

    @property
    def prompt_ids(self) -> list[str]:
        return [p.prompt_id for p in self.prompts]


def set_id(prompt_ids: list[str]) -> str:
    return "ps-" + hashlib.sha256("\n".join(sorted(set(prompt_ids))).encode()).hexdigest()[:12]


def select_prompt_set(store: Store, sql: str) -> PromptSet:
    """The prompts whose ids the user's query returns (a `prompt_id` column, or its only column)."""
    result = store.read_only_query(sql)
    names = result.column_names
    if "prompt_id" in names:
        column = "prompt_id"
    elif len(names) == 1:
        column = names[0]
    else:
        raise ReplayError(f"--prompts: the query must return a prompt_id column (it returns {', '.join(names)})")
    ids = sorted({str(v) for v in result.column(column).to_pylist() if v is not None})
    if not ids:
        raise ReplayError(f"--prompts: the query returned no prompt ids ({sql!r})")
    rows = store.query("SELECT DISTINCT ON (prompt_id) prompt_id, source, split, problem, answer, level, subject, "
                       "unique_id, solution FROM prompts WHERE prompt_id IN (SELECT unnest(?)) "
                       "ORDER BY prompt_id, created_at", [ids]).to_pylist()
    unknown = sorted(set(ids) - {r["prompt_id"] for r in rows})
    if unknown:
        raise ReplayError(f"--prompts: {len(unknown)} id(s) the query returned are not prompts of {store.root} "
                          f"(e.g. {unknown[0]!r}); select prompt_id values from the store's views")
    return PromptSet(sql, set_id(ids), tuple(Prompt(**r) for r in rows))


def record_prompt_set(store: Store, prompt_set: PromptSet) -> None:
    """Keep the set's SQL and ids in the `prompt_sets` table (once per id)."""
    known = store.query("SELECT count(*) AS n FROM prompt_sets WHERE prompt_set_id = ?", [prompt_set.prompt_set_id])
    if known.column("n")[0].as_py():
        return
    store.write("prompt_sets", [dict(prompt_set_id=prompt_set.prompt_set_id, sql=prompt_set.sql,
                                     n_prompts=len(prompt_set.prompts), prompt_ids=prompt_set.prompt_ids,
                                     created_at=utc_now())], name=prompt_set.prompt_set_id)
