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

FORMATS = ("table", "csv", "json", "markdown", "parquet")


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


def write_result(table: pa.Table, fmt: str, output: str | None) -> None:
    """Write `table` in `fmt` to `output` (a file) or stdout."""
    if fmt not in FORMATS:
        raise ReplayError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "table":
        if output:
            raise ReplayError("--format table prints to the terminal; use csv, json or parquet with --output")
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
    else:
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
