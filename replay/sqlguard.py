"""Read-only guard for user SQL, decided by DuckDB's own parser, never by matching text.

A user's text must parse as exactly one statement, and that statement must be a query (SELECT,
WITH, FROM-first, DESCRIBE, SUMMARIZE, SHOW TABLES, VALUES): no other statement kind can write,
attach, load, set or call. Every node of the query's syntax tree (DuckDB's `json_serialize_sql`),
wherever it sits (subquery, CTE, LATERAL, IN, UNION arm, DESCRIBE's inner query), is checked: no
function that runs SQL given as a string (`query`, `json_execute_serialized_sql`, …) or reads a
setting or the environment; table functions only from an allow-list (files, generators, the
catalog), since DuckDB releases add table functions that report settings, paths, memory or logs;
no SHOW but SHOW [ALL] TABLES (`SHOW name` reads the setting `name`). EXPLAIN [ANALYZE] is served by
running the inner query's own plan through the relation API, so the statement that runs is always
the checked query itself.

The connection (Store.read_only_connection) is the second wall: file access limited to the store,
a private temp directory, configuration locked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb

from .errors import ReplayError

# functions that execute SQL handed to them as a string (the check cannot see inside a string),
# or that read the connection's settings, variables or the environment (scalar ones included)
DENIED_FUNCTIONS = frozenset({
    "query", "query_table", "json_execute_serialized_sql", "json_deserialize_sql",
    "current_setting", "getenv", "getvariable",
    "get_block_size",  # a system macro over pragma_database_size() (the guard cannot see into macros)
})
# the table functions a query may read from: files (the connection confines them to the store),
# generated values, and the catalog's views and columns. Every other one is refused: they report
# settings (duckdb_settings, pragma_database_size's memory limit, duckdb_profiling_settings),
# paths (duckdb_temporary_files, duckdb_extensions, duckdb_databases), secrets, memory, logs, or
# change the connection's state (enable_logging, checkpoint), and each DuckDB release adds more.
ALLOWED_TABLE_FUNCTIONS = frozenset({
    "read_parquet", "parquet_scan", "read_csv", "read_csv_auto", "read_json", "read_json_auto",
    "read_ndjson", "read_ndjson_auto", "read_json_objects", "read_json_objects_auto",
    "read_ndjson_objects", "read_text", "read_blob", "glob", "sniff_csv", "parquet_metadata",
    "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "parquet_full_metadata",
    "parquet_page_index", "parquet_bloom_probe",
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "duckdb_views", "duckdb_tables", "duckdb_columns", "duckdb_schemas", "duckdb_functions",
    "duckdb_types", "duckdb_keywords", "duckdb_constraints", "duckdb_indexes", "duckdb_dependencies",
    "duckdb_sequences", "pragma_table_info", "pragma_show",
})
# system views over refused functions (tests/test_sql_attacks.py checks every system view and
# macro of the installed DuckDB against the guard)
DENIED_TABLES = frozenset({"pg_settings", "duckdb_settings", "duckdb_databases", "pragma_database_list",
                           "pg_database", "duckdb_logs", "pg_prepared_statements"})
# the table functions that list the catalog: a query using one sees every view of the store
CATALOG_FUNCTIONS = frozenset({"duckdb_views", "duckdb_tables", "duckdb_columns", "duckdb_constraints",
                               "duckdb_indexes", "duckdb_dependencies"})
SHOW_TABLES = ('"tables"', "__show_tables_expanded")  # SHOW TABLES, SHOW ALL TABLES as parsed


@dataclass(frozen=True)
class CheckedQuery:
    """A single read-only query: run `sql` (plain) or its plan (`explain` = standard | analyze);
    `lists_catalog`: it asks which views exist (SHOW TABLES, duckdb_views(), information_schema …)."""
    sql: str
    explain: str | None = None
    lists_catalog: bool = False


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> CheckedQuery:
    """Parse `sql`; return it as a CheckedQuery if it is one read-only query, else raise ReplayError."""
    statement = _single_statement(con, sql)
    if statement.type == duckdb.StatementType.EXPLAIN:
        analyze, inner = _explain_parts(sql)
        inner_statement = _single_statement(con, inner)
        if inner_statement.type != duckdb.StatementType.SELECT:
            raise ReplayError(f"refused: EXPLAIN of a {_kind(inner_statement)} statement; "
                              "only queries can be explained")
        return CheckedQuery(inner, "analyze" if analyze else "standard", _check_tree(con, inner))
    if statement.type != duckdb.StatementType.SELECT:
        kind = _kind(statement)
        raise ReplayError(f"refused: `replay sql` is read-only, and this is {'an' if kind[0] in 'AEIOU' else 'a'} "
                          f"{kind} statement; "
                          "only queries (SELECT, WITH, FROM, DESCRIBE, SUMMARIZE, EXPLAIN) run")
    return CheckedQuery(sql, lists_catalog=_check_tree(con, sql))


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


def _check_tree(con: duckdb.DuckDBPyConnection, sql: str) -> bool:
    """Refuse what the tree must not hold, in any position; return whether it lists the catalog."""
    # the text goes in as a bound value: the parser reads it, nothing splices it
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if tree.get("error"):
        raise ReplayError(f"refused: cannot check this query ({tree.get('error_message', 'unknown form')})")
    lists_catalog = False
    for node in _nodes(tree):
        kind = node.get("type")
        name = str(node.get("function_name") or node.get("table_name") or "").lower()
        if "function_name" in node and name in DENIED_FUNCTIONS:
            raise ReplayError(f"refused: {name}() is not available in `replay sql` "
                              "(it runs SQL from a string or reads the connection's settings)")
        if kind == "TABLE_FUNCTION":
            name = str((node.get("function") or {}).get("function_name", "")).lower()
            if name not in ALLOWED_TABLE_FUNCTIONS:
                raise ReplayError(f"refused: the table function {name}() is not available in `replay sql` "
                                  "(table functions: files, range/unnest/generate_series, the catalog's)")
            lists_catalog |= name in CATALOG_FUNCTIONS
        elif kind == "BASE_TABLE":
            if name.strip('"') in DENIED_TABLES:
                raise ReplayError(f"refused: {name} is not available in `replay sql`")
            lists_catalog |= (str(node.get("schema_name", "")).lower() in ("information_schema", "pg_catalog")
                              or name.startswith(("duckdb_", "sqlite_", "pg_")))
        elif kind == "SHOW_REF" and node.get("query") is None:  # DESCRIBE/SUMMARIZE <query>: checked inside
            if node.get("show_type") != "SHOW_FROM" and name not in SHOW_TABLES:
                raise ReplayError(f"refused: SHOW {name} (SHOW <name> reads the setting of that name); "
                                  "`replay sql` runs SHOW TABLES, SHOW ALL TABLES and DESCRIBE <view>")
            lists_catalog = True
    return lists_catalog


def _nodes(node):
    """Every dict in the tree, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)
