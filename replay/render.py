"""Turning Arrow tables into terminal tables, CSV, JSON, Markdown or Parquet (the CLI's output edge)."""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import pyarrow as pa

from .errors import ReplayError

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


def _cell(value, width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = str(value).replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(table: pa.Table, title: str | None = None, max_width: int = 80) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title=title, show_lines=False, header_style="bold")
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.to_pylist():
        view.add_row(*(_cell(v, max_width) for v in row.values()))
    Console(width=max(160, 12 * len(table.column_names))).print(view)
    if table.num_rows == 0:
        print("(no rows)")


def write_result(table: pa.Table, fmt: str | None, output: str | None) -> None:
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
    if fmt == "csv":
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


def markdown_table(table: pa.Table) -> str:
    """A GitHub-flavoured Markdown table (numbers as in the terminal table, `|` escaped)."""
    def cell(value) -> str:
        if isinstance(value, (list, dict)):
            value = json.dumps(value, default=str)
        return _cell(value, 10**9).replace("|", "\\|")

    lines = ["| " + " | ".join(table.column_names) + " |", "|" + "---|" * table.num_columns]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in table.to_pylist()]
    return "\n".join(lines) + "\n"


def _atomic(output: str, write) -> None:
    """Write through a temp file beside `output`, then rename: no half-written result file."""
    target = Path(output)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except OSError as exc:
        raise ReplayError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _flatten_lists(table: pa.Table) -> pa.Table:
    # CSV has no list type: render list cells as JSON text
    columns = []
    for col in table.columns:
        if pa.types.is_list(col.type) or pa.types.is_struct(col.type) or pa.types.is_map(col.type):
            col = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
        columns.append(col)
    return pa.Table.from_arrays(columns, names=table.column_names)
