"""Turning query results into terminal tables, CSV, JSON, Markdown or Parquet (the CLI's output edge).

A result is an Arrow table or `Rows` (plain Python rows straight from DuckDB): `replay sql`,
`inspect` and `status` print Rows, so that they start without importing pyarrow (and numpy).
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ReplayError

if TYPE_CHECKING:  # annotations only: sql, inspect and status print without importing pyarrow
    import pyarrow as pa

FORMATS = ("table", "csv", "json", "jsonl", "markdown", "parquet")
# -o FILE without -f: the format from the file's extension
EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".md": "markdown",
              ".markdown": "markdown", ".parquet": "parquet"}


def format_for(fmt: str | None, output: str | None) -> str:
    """The explicit --format, else the output file's extension, else a terminal table."""
    if fmt:
        return fmt
    if not output:
        return "table"
    suffix = Path(output).suffix.lower()
    if suffix not in EXTENSIONS:
        raise ReplayError(f"cannot tell the format of {output!r} from its extension: pass --format "
                          f"({', '.join(f for f in FORMATS if f != 'table')}) or name it "
                          f"{' / '.join('*' + e for e in EXTENSIONS)}")
    return EXTENSIONS[suffix]


@dataclass
class Rows:
    """A query result as Python tuples, with the few table methods the printers use."""

    column_names: list[str]
    rows: list[tuple]

    @classmethod
    def of(cls, relation) -> "Rows":
        """Fetch a DuckDB relation."""
        return cls(list(relation.columns), relation.fetchall())

    @classmethod
    def from_pylist(cls, rows: list[dict], names: list[str]) -> "Rows":
        return cls(list(names), [tuple(row[n] for n in names) for row in rows])

    def rename_columns(self, names: list[str]) -> "Rows":
        return Rows(list(names), self.rows)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_columns(self) -> int:
        return len(self.column_names)

    def to_pylist(self) -> list[dict]:
        return [dict(zip(self.column_names, row)) for row in self.rows]


def fetcher(fmt: str):
    """How `replay sql` fetches its result for `fmt`: Arrow only for Parquet output."""
    return None if fmt == "parquet" else Rows.of


def _cell(value, width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = str(value).replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(table: pa.Table | Rows, title: str | None = None, max_width: int = 80) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # every string goes in as rich Text, never as markup: data such as "[/INST]" prints as it is
    view = Table(title=None if title is None else Text(title), show_lines=False, header_style="bold")
    for name in table.column_names:
        view.add_column(Text(name), overflow="fold")
    for row in table.to_pylist():
        view.add_row(*(Text(_cell(v, max_width)) for v in row.values()))
    Console(width=max(160, 12 * len(table.column_names))).print(view)
    if table.num_rows == 0:
        print("(no rows)")


def write_result(table: pa.Table | Rows, fmt: str | None, output: str | None) -> None:
    """Write `table` in `fmt` (None: from the output's extension) to `output` (a file) or stdout."""
    fmt = format_for(fmt, output)
    if fmt not in FORMATS:
        raise ReplayError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "table":
        if output:
            raise ReplayError("--format table prints to the terminal; use csv, json, jsonl, markdown or parquet "
                              "with --output")
        print_table(table)
        return
    if fmt == "parquet":
        if not output:
            raise ReplayError("--format parquet needs --output FILE")
        import pyarrow.parquet as pq

        _atomic(output, lambda tmp: pq.write_table(table, tmp))
        return
    if fmt == "csv" and isinstance(table, Rows):
        payload = csv_text(table)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        buffer = io.BytesIO()
        pacsv.write_csv(_flatten_lists(table), buffer)
        payload = buffer.getvalue().decode("utf-8")
    elif fmt == "markdown":
        payload = markdown_table(table)
    elif fmt == "json":  # one JSON array of row objects
        payload = json.dumps(table.to_pylist(), default=str, ensure_ascii=False, indent=1) + "\n"
    else:  # jsonl: JSON Lines, one row object per line
        payload = "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in table.to_pylist())
    if output:
        _atomic(output, lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
    else:
        sys.stdout.write(payload)


def csv_text(table: Rows) -> str:
    """CSV as pyarrow writes it: names and text quoted, numbers, booleans and times bare, NULL empty,
    lists and structs as JSON text."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, dict, tuple)):
            value = json.dumps(value, default=str)
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "backslashreplace")
        elif not isinstance(value, str):
            return str(value)  # numbers, decimals, dates, times: bare
        return '"' + value.replace('"', '""') + '"'

    lines = [",".join(cell(name) for name in table.column_names)]
    lines += [",".join(cell(v) for v in row) for row in table.rows]
    return "\n".join(lines) + "\n"


def markdown_table(table: pa.Table | Rows) -> str:
    """A GitHub-flavoured Markdown table (numbers as in the terminal table, `|` escaped)."""
    def cell(value) -> str:
        if isinstance(value, (list, dict)):
            value = json.dumps(value, default=str)
        return _cell(value, 10**9).replace("|", "\\|")

    lines = ["| " + " | ".join(table.column_names) + " |", "|" + "---|" * table.num_columns]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in table.to_pylist()]
    return "\n".join(lines) + "\n"


def _atomic(output: str, write) -> None:
    """No half-written result file, even after a crash (replay.storage.local.atomic_write)."""
    from ..storage.local import atomic_write

    try:
        atomic_write(Path(output), lambda tmp: write(str(tmp)))
    except OSError as exc:
        raise ReplayError(f"cannot write {output}: {exc.strerror or exc}") from None


def _flatten_lists(table: pa.Table) -> pa.Table:
    import pyarrow as pa

    # CSV has no list type: render list cells as JSON text
    columns = []
    for col in table.columns:
        if pa.types.is_list(col.type) or pa.types.is_struct(col.type) or pa.types.is_map(col.type):
            col = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
        columns.append(col)
    return pa.Table.from_arrays(columns, names=table.column_names)
