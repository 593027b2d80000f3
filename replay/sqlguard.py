"""Read-only guard for user SQL, decided by DuckDB's own parser, never by matching text.

A user's text must parse as exactly one statement, and that statement must be a query (SELECT,
WITH, FROM-first, DESCRIBE, SUMMARIZE, SHOW, VALUES): no other statement kind can write, attach,
load, set or call. The query's syntax tree (DuckDB's `json_serialize_sql`) must not name a
function that runs SQL given as a string (`query`, `json_execute_serialized_sql`, …) or reads the
connection's settings. EXPLAIN [ANALYZE] is served by running the inner query's own plan through
the relation API, so the statement that runs is always the checked query itself.

The connection (Store.read_only_connection) is the second wall: file access limited to the store,
a private temp directory, configuration locked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb

from .errors import ReplayError

# functions that execute SQL handed to them as a string (the check cannot see inside a string),
# or that read the connection's settings (the allowed directories, the temp directory)
DENIED_FUNCTIONS = frozenset({
    "query", "query_table", "json_execute_serialized_sql", "json_deserialize_sql",
    "current_setting", "duckdb_settings", "duckdb_temporary_files", "getenv",
    "duckdb_secrets", "which_secret", "duckdb_extensions",
})
# system views over those functions
DENIED_TABLES = frozenset({"pg_settings", "duckdb_settings"})


@dataclass(frozen=True)
class CheckedQuery:
    """A single read-only query: run `sql` (plain) or its plan (`explain` = standard | analyze)."""
    sql: str
    explain: str | None = None


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> CheckedQuery:
    """Parse `sql`; return it as a CheckedQuery if it is one read-only query, else raise ReplayError."""
    statement = _single_statement(con, sql)
    if statement.type == duckdb.StatementType.EXPLAIN:
        analyze, inner = _explain_parts(sql)
        inner_statement = _single_statement(con, inner)
        if inner_statement.type != duckdb.StatementType.SELECT:
            raise ReplayError(f"refused: EXPLAIN of a {_kind(inner_statement)} statement; "
                              "only queries can be explained")
        _check_tree(con, inner)
        return CheckedQuery(inner, "analyze" if analyze else "standard")
    if statement.type != duckdb.StatementType.SELECT:
        kind = _kind(statement)
        raise ReplayError(f"refused: `replay sql` is read-only, and this is {'an' if kind[0] in 'AEIOU' else 'a'} "
                          f"{kind} statement; "
                          "only queries (SELECT, WITH, FROM, DESCRIBE, SUMMARIZE, EXPLAIN) run")
    _check_tree(con, sql)
    return CheckedQuery(sql)


def _kind(statement) -> str:
    return statement.type.name.replace("_", " ")


def _single_statement(con: duckdb.DuckDBPyConnection, sql: str):
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReplayError(f"cannot parse SQL: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise ReplayError("no SQL statement given")
    if len(statements) > 1:
        raise ReplayError(f"give one statement at a time (this text holds {len(statements)}); "
                          "combine queries with WITH or UNION ALL")
    return statements[0]


def _explain_parts(sql: str) -> tuple[bool, str]:
    """(analyze?, inner query text) of an EXPLAIN statement, read from DuckDB's tokens: comments
    are tokens of their own, so text inside a comment is never taken for a keyword."""
    tokens = duckdb.tokenize(sql)
    ends = [pos for pos, _ in tokens[1:]] + [len(sql)]
    words = [(pos, sql[pos:end].strip().lower()) for (pos, kind), end in zip(tokens, ends)
             if kind != duckdb.token_type.comment]
    if not words or words[0][1] != "explain":
        raise ReplayError("refused: an EXPLAIN statement that does not start with EXPLAIN")
    rest = words[1:]
    analyze = bool(rest) and rest[0][1] in ("analyze", "analyse")
    if analyze:
        rest = rest[1:]
    if not rest or rest[0][1].startswith("("):
        raise ReplayError("refused: use EXPLAIN <query> or EXPLAIN ANALYZE <query> (no EXPLAIN options)")
    return analyze, sql[rest[0][0]:]


def _check_tree(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    # the text goes in as a bound value: the parser reads it, nothing splices it
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if tree.get("error"):
        raise ReplayError(f"refused: cannot check this query ({tree.get('error_message', 'unknown form')})")
    for key, value in _walk(tree):
        name = value.lower() if isinstance(value, str) else ""
        if key == "function_name" and name in DENIED_FUNCTIONS:
            raise ReplayError(f"refused: {name}() is not available in `replay sql` "
                              "(it runs SQL from a string or reads the connection's settings)")
        if key == "table_name" and name.strip('"') in DENIED_TABLES:
            raise ReplayError(f"refused: {name} is not available in `replay sql`")


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
