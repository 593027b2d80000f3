"""Read-only guard for user SQL.

Two layers: the statement type must be a plain query (checked here, with DuckDB's own parser,
not by matching text), and the connection itself has external access limited to the store and
its configuration locked (see Store.read_only_connection), so a query cannot read elsewhere,
load extensions or change settings either.
"""

from __future__ import annotations

import duckdb

from .errors import ReplayError

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    """Parse `sql`; return its statements if every one only reads, else raise ReplayError."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReplayError(f"cannot parse SQL: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise ReplayError("no SQL statement given")
    for statement in statements:
        if statement.type not in _ALLOWED:
            kind = statement.type.name.replace("_", " ")
            article = "an" if kind[0] in "AEIOU" else "a"
            raise ReplayError(f"refused: `replay sql` is read-only, and this is {article} {kind} statement "
                              f"({statement.query.strip()[:60]!r}); only SELECT/WITH/EXPLAIN queries run")
        if statement.type == duckdb.StatementType.EXPLAIN and "analyze" in statement.query.lower():
            # EXPLAIN ANALYZE executes its statement: only allow it around a query
            inner = con.extract_statements(statement.query.lower().split("analyze", 1)[1])
            if any(s.type != duckdb.StatementType.SELECT for s in inner):
                raise ReplayError("refused: EXPLAIN ANALYZE of a statement that is not a query")
    return statements
