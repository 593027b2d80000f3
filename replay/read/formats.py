"""Turning query results into terminal tables, CSV, JSON, Markdown or Parquet (the CLI's output edge).

A result is an Arrow table or `Rows` (plain Python rows straight from DuckDB): `replay sql`,
`inspect` and `status` print Rows, so that they start without importing pyarrow (and numpy).
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
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
    if not output or output == "-":
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


# store text may hold terminal escapes (ESC[2J clears the screen): tables show every control
# character (C0, DEL, C1) as an escape instead of sending it to the terminal; newlines stay ⏎
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))} | {
    ord("\n"): " ⏎ ", ord("\t"): "\\t", ord("\r"): "\\r"}


def visible(text: str) -> str:
    """`text` safe for a terminal: control characters written as escapes."""
    return text.translate(_VISIBLE)


def _cell(value, width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = visible(str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(table: pa.Table | Rows, title: str | None = None, max_width: int = 80) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # every string goes in as rich Text, never as markup: data such as "[/INST]" prints as it is
    view = Table(title=None if title is None else Text(visible(title)), show_lines=False, header_style="bold")
    for name in table.column_names:
        view.add_column(Text(visible(name)), overflow="fold")
    for row in table.to_pylist():
        view.add_row(*(Text(_cell(v, max_width)) for v in row.values()))
    Console(width=max(160, 12 * len(table.column_names))).print(view)
    if table.num_rows == 0:
        print("(no rows)")


def write_result(table: pa.Table | Rows, fmt: str | None, output: str | None) -> None:
    """Write `table` in `fmt` (None: from the output's extension) to `output` (a file; None or "-": stdout)."""
    fmt = format_for(fmt, output)
    if fmt not in FORMATS:
        raise ReplayError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "table":
        if output and output != "-":
            raise ReplayError("--format table prints to the terminal; use csv, json, jsonl, markdown or parquet "
                              "with --output")
        print_table(table)
        return
    if fmt == "parquet":
        if not output:
            raise ReplayError("--format parquet needs --output FILE (or -o - for stdout)")
        if output_target(output)[0] == "stdout" and sys.stdout.isatty():
            raise ReplayError("refused: binary Parquet to a terminal; redirect stdout or name a file with -o")
        import pyarrow.parquet as pq

        _write(output, lambda fh: pq.write_table(table, fh))
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
        _write(output, lambda fh: fh.write(payload.encode("utf-8")))
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

    lines = ["| " + " | ".join(map(visible, table.column_names)) + " |", "|" + "---|" * table.num_columns]
    lines += ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in table.to_pylist()]
    return "\n".join(lines) + "\n"


def output_target(output: str | None) -> tuple[str, str | None]:
    """How -o/--out writes, checked before any work (one line for what it refuses):
    ("stdout", None) for no output, `-` or a name of stdout itself (/dev/stdout: reopening it would
    truncate a file that stdout appends to); ("in place", output) for a FIFO or character device
    (a reader or a device is behind that very name: never replace it); ("replace", path) for a
    regular file or a new one, `path` with symlinks resolved (a symlink stays, its file is replaced).
    Directories are not created: a missing one is refused."""
    if output is None or output == "-":
        return "stdout", None
    if output.endswith(os.sep):
        raise ReplayError(f"refused: {output} names a directory; give a file name")
    try:
        st = os.stat(output)  # follows symlinks, /proc/self/fd/N included
    except FileNotFoundError:
        path = os.path.realpath(output)  # a dangling symlink: the file it names
        if not os.path.isdir(os.path.dirname(path)):
            raise ReplayError(f"cannot write {output}: directory {os.path.dirname(path)} does not exist; "
                              "create it first") from None
        return "replace", path
    except OSError as exc:
        raise ReplayError(f"cannot write {output}: {exc.strerror or exc}") from None
    if _is_stdout(st):
        return "stdout", None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "replace", os.path.realpath(output)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "in place", output
    kind = "a directory" if stat.S_ISDIR(mode) else "neither a regular file, a FIFO nor a character device"
    raise ReplayError(f"refused: {output} is {kind}")


def _is_stdout(st: os.stat_result) -> bool:
    try:
        return os.path.samestat(st, os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):  # no stdout fd (a test runner's buffer)
        return False


def _write(output: str, write) -> None:
    """`write(fh)` fills a binary file: stdout, the FIFO or device itself, or a temp file renamed onto a
    regular file (no half-written result, even after a crash: replay.storage.local.atomic_write)."""
    from ..storage.local import atomic_write

    how, path = output_target(output)
    try:
        if how == "stdout":
            sys.stdout.flush()
            write(sys.stdout.buffer)
            sys.stdout.buffer.flush()
        elif how == "in place":
            with open(path, "wb") as fh:  # O_TRUNC: ignored by FIFOs and devices
                write(fh)
        else:
            atomic_write(Path(path), lambda tmp: _fill(tmp, write))
    except OSError as exc:
        raise ReplayError(f"cannot write {output}: {exc.strerror or exc}") from None


def _fill(path: Path, write) -> None:
    with open(path, "wb") as fh:
        write(fh)


def _flatten_lists(table: pa.Table) -> pa.Table:
    import pyarrow as pa

    # CSV has no list type: render list cells as JSON text
    columns = []
    for col in table.columns:
        if pa.types.is_list(col.type) or pa.types.is_struct(col.type) or pa.types.is_map(col.type):
            col = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
        columns.append(col)
    return pa.Table.from_arrays(columns, names=table.column_names)
