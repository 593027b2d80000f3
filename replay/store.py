"""The store: a directory of Hive-partitioned Parquet files plus JSON manifests.

This is the only module that touches Parquet files or DuckDB. Writes are append-only and atomic
(temp file in the same directory, fsync, rename); rows are never updated in place. Readers only
ever glob `part-*.parquet`, so a half-written `.tmp-*` file is invisible to them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas

from . import __version__
from .errors import ReplayError
from .sqlguard import check_read_only

STORE_FILE = "store.json"
# temp files name their writer's host: shard workers on several machines share a store directory,
# and a pid is only meaningful on the machine that issued it
HOST_TAG = "h" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


class StoreError(ReplayError):
    """A store that is missing, of another schema version, or given data it cannot hold."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _duckdb_type(typ: pa.DataType) -> str:
    if pa.types.is_list(typ):
        return _duckdb_type(typ.value_type) + "[]"
    if pa.types.is_timestamp(typ):
        return "TIMESTAMPTZ" if typ.tz else "TIMESTAMP"
    names = {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
             pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN", pa.string(): "VARCHAR"}
    return names[typ]


def validate(table_name: str, data: pa.Table | Iterable[Mapping]) -> pa.Table:
    """Return `data` as an Arrow table of the table's schema, or raise naming the bad column."""
    schema = schemas.TABLES[table_name]
    if not isinstance(data, pa.Table):
        rows = list(data)
        missing = [f.name for f in schema if rows and f.name not in rows[0]]
        if missing:
            raise StoreError(f"{table_name}: rows lack column(s) {', '.join(missing)}")
        try:
            data = pa.Table.from_pylist(rows, schema=_relaxed(schema)) if rows else schema.empty_table()
        except (pa.ArrowException, UnicodeEncodeError, OverflowError, TypeError) as exc:
            # the readers validate input first; this is the last line of defence, still one line
            raise StoreError(f"{table_name}: rows do not fit the schema: {exc}") from None
    extra = [n for n in data.column_names if n not in schema.names]
    if extra:
        raise StoreError(f"{table_name}: unknown column(s) {', '.join(extra)}")
    columns = []
    for field in schema:
        if field.name not in data.column_names:
            raise StoreError(f"{table_name}: missing column {field.name!r}")
        col = data.column(field.name)
        try:
            col = col.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"{table_name}.{field.name}: expected {field.type}, got {col.type}: {exc}") from None
        if not field.nullable and col.null_count:
            first = col.to_pylist().index(None)
            raise StoreError(f"{table_name}.{field.name}: NULL in a required column (row {first})")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def _relaxed(schema: pa.Schema) -> pa.Schema:
    # from_pylist with nullable fields, so that a NULL is reported by validate() by column name
    return pa.schema([f.with_nullable(True) for f in schema])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(name: str) -> str:
    """`.tmp-<pid>-<host tag>-<name>`: hidden from readers, reaped only once its writer is gone."""
    return f".tmp-{os.getpid()}-{HOST_TAG}-{name}"


def _is_host_tag(text: str) -> bool:
    return len(text) == 9 and text[0] == "h" and all(c in "0123456789abcdef" for c in text[1:])


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(f"{uuid.uuid4().hex}-{path.name}"))
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def clean_temp_files(directory: Path) -> int:
    """Remove `.tmp-<pid>-*` leftovers whose writing process is gone (crashed writers).

    A temp file tagged with another host is left alone: its pid says nothing about this machine."""
    removed = 0
    for tmp in directory.glob(".tmp-*"):
        parts = tmp.name.split("-")
        try:
            pid = int(parts[1])
        except (IndexError, ValueError):
            continue
        if len(parts) > 2 and _is_host_tag(parts[2]) and parts[2] != HOST_TAG:
            continue
        if not _pid_alive(pid):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _store_root(path: str | os.PathLike) -> Path:
    root = Path(path).absolute()
    if any(part.startswith("round=") for part in root.parts):
        # DuckDB's Hive parsing takes the first round=... directory of a path as the rows' round
        raise StoreError(f"{root}: a store may not live inside a directory named round=...")
    return root


class Store:
    def __init__(self, root: Path, meta: dict):
        self.root = root
        self.meta = meta

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, base_model: str | None = None) -> "Store":
        root = _store_root(path)
        if (root / STORE_FILE).exists():
            return cls.open(root)
        meta = {"schema_version": schemas.SCHEMA_VERSION, "created_at": utc_now().isoformat(),
                "base_model": base_model, "replay_version": __version__}
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(root / STORE_FILE, json.dumps(meta, indent=2).encode())
        except OSError as exc:
            raise StoreError(f"cannot create store at {root}: {exc.strerror or exc}") from None
        return cls(root, meta)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        root = _store_root(path)
        meta_path = root / STORE_FILE
        if not meta_path.exists():
            raise StoreError(f"no replay store at {root} (missing {STORE_FILE}); "
                             "create one with `replay generate` or `replay import`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{meta_path}: unreadable store metadata: {exc}") from None
        version = meta.get("schema_version")
        if version != schemas.SCHEMA_VERSION:
            raise StoreError(f"{meta_path}: store schema version {version}, this replay reads "
                             f"version {schemas.SCHEMA_VERSION}; use a matching replay release")
        return cls(root, meta)

    # -- paths -----------------------------------------------------------------------------
    def table_dir(self, table: str, round: int | None = None) -> Path:
        if table not in schemas.TABLES:
            raise StoreError(f"unknown table {table!r}; tables: {', '.join(schemas.TABLES)}")
        base = self.root / table
        if table in schemas.PARTITIONED:
            if round is None:
                raise StoreError(f"table {table} is partitioned by round: give a round")
            return base / f"round={int(round)}"
        return base

    def files(self, table: str, round: int | None = None) -> list[Path]:
        if table in schemas.PARTITIONED and round is None:
            return sorted((self.root / table).glob("round=*/part-*.parquet"))
        return sorted(self.table_dir(table, round).glob("part-*.parquet"))

    def adapter_dir(self, round: int, name: str = "main") -> Path:
        """adapters/round=R for the round's policy; adapters/name=NAME/round=R for A/B variants."""
        if name == "main":
            return self.root / "adapters" / f"round={int(round)}"
        if not name.replace("-", "").replace("_", "").isalnum():
            raise StoreError(f"adapter name {name!r}: use letters, digits, - and _ only")
        return self.root / "adapters" / f"name={name}" / f"round={int(round)}"

    def manifest_path(self, round: int, stage: str) -> Path:
        return self.root / "manifests" / f"round={int(round)}" / f"{stage}.json"

    # -- writes ----------------------------------------------------------------------------
    def write(self, table: str, data: pa.Table | Iterable[Mapping], round: int | None = None,
              name: str | None = None) -> Path | None:
        """Validate and append one part file; returns its path (None for no rows).

        `name` gives the part a fixed name (`part-<name>.parquet`) that a rerun replaces atomically:
        for outputs written once per run (learn audit and metrics), so a crashed run leaves no duplicate.
        """
        arrow = validate(table, data)
        if arrow.num_rows == 0:
            return None
        if table in schemas.PARTITIONED:
            rounds = set(arrow.column("round").to_pylist())
            if round is None and len(rounds) == 1:
                round = rounds.pop()
            elif rounds != {round}:
                raise StoreError(f"{table}: rows of rounds {sorted(rounds)} written to round {round}")
            arrow = arrow.drop_columns(["round"])  # lives in the directory name
        directory = self.table_dir(table, round)
        final = directory / f"part-{name or uuid.uuid4().hex}.parquet"
        tmp = directory / temp_name(final.name)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            clean_temp_files(directory)
            pq.write_table(arrow, tmp, compression="zstd")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(directory)
        except OSError as exc:
            raise StoreError(f"cannot write {final}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def write_manifest(self, round: int, stage: str, record: Mapping) -> Path:
        missing = [k for k in schemas.MANIFEST_KEYS if k not in record]
        if missing:
            raise StoreError(f"manifest {stage}: missing key(s) {', '.join(missing)}")
        path = self.manifest_path(round, stage)
        try:
            atomic_write_bytes(path, json.dumps(record, indent=2, default=str).encode())
        except OSError as exc:  # disk full, permission denied: the old manifest (if any) stays intact
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    def read_manifest(self, round: int, stage: str) -> dict | None:
        path = self.manifest_path(round, stage)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: corrupt manifest: {exc}") from None

    def rounds(self) -> list[int]:
        """Rounds that have any rollout files or manifests."""
        found = set()
        for pattern in ("rollouts/round=*", "manifests/round=*"):
            for p in self.root.glob(pattern):
                try:
                    found.add(int(p.name.split("=", 1)[1]))
                except ValueError:
                    continue
        return sorted(found)

    # -- reads -----------------------------------------------------------------------------
    def _source(self, table: str) -> str:
        schema = schemas.TABLES[table]
        if table in schemas.PARTITIONED:
            glob = self.root / table / "round=*" / "part-*.parquet"
            exists = any((self.root / table).glob("round=*/part-*.parquet"))
            opts = "hive_partitioning = true, hive_types = {'round': INTEGER}, union_by_name = true"
        else:
            glob = self.root / table / "part-*.parquet"
            exists = any((self.root / table).glob("part-*.parquet"))
            opts = "union_by_name = true"
        if exists:
            cols = ", ".join(f'"{f.name}"' for f in schema)
            path = str(glob).replace("'", "''")
            return f"SELECT {cols} FROM read_parquet('{path}', {opts})"
        # no files yet: an empty relation with the right columns, so every view still binds
        cols = ", ".join(f'CAST(NULL AS {_duckdb_type(f.type)}) AS "{f.name}"' for f in schema)
        return f"SELECT {cols} WHERE false"

    def _stage_runs_source(self) -> str:
        """The manifests as rows: which stage ran on which round, its status, time and counts."""
        columns = {"stage": "VARCHAR", "round": "INTEGER", "status": "VARCHAR", "started_at": "TIMESTAMPTZ",
                   "finished_at": "TIMESTAMPTZ", "seconds": "DOUBLE", "counts": "JSON"}
        if not any(p for p in self.root.glob("manifests/round=*/*.json") if not p.name.startswith(".")):
            empty = [f"CAST(NULL AS {kind}) AS {name}" for name, kind in (columns | {"path": "VARCHAR"}).items()]
            return f"SELECT {', '.join(empty)} WHERE false"
        typed = ", ".join(f"{name}: '{kind}'" for name, kind in columns.items())
        path = str(self.root / "manifests" / "round=*" / "[!.]*.json").replace("'", "''")  # not .tmp-*
        return (f"SELECT {', '.join(columns)}, filename AS path FROM read_json('{path}', "
                f"columns = {{{typed}}}, hive_partitioning = false, filename = true)")

    def connect(self, threads: int | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table and view of the store registered.

        CREATE VIEW reads the footers of the files behind it: a truncated shard fails here."""
        con = duckdb.connect(":memory:")
        try:
            if threads:
                con.execute(f"SET threads = {int(threads)}")
            for table in schemas.TABLES:
                con.execute(f"CREATE VIEW {table} AS {self._source(table)}")
            con.execute(f"CREATE VIEW stage_runs AS {self._stage_runs_source()}")
            for view in schemas.VIEW_FILES:
                con.execute(schemas.view_sql(view))
        except duckdb.Error as exc:
            con.close()
            raise self.query_error(exc) from None
        return con

    def query_error(self, exc: duckdb.Error) -> StoreError:
        """One line for a failed query. DuckDB names a file whose footer is damaged, not one with a
        corrupt page behind a sound footer: then point at `replay doctor --deep`, which finds it."""
        message = f"query failed: {_first_line(exc)}"
        if type(exc) in _DATA_ERRORS and str(self.root) not in message:
            message += (f" (a file of the store may be corrupt: `replay doctor --store {self.root} --deep` "
                        "names it)")
        return StoreError(message)

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        """Trusted, internal query (stages use it); returns an Arrow table."""
        con = self.connect()
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise self.query_error(exc) from None
        finally:
            con.close()

    def read_only_connection(self, allow_read: Iterable[str | os.PathLike] = ()) -> duckdb.DuckDBPyConnection:
        """A connection for user SQL: file access limited to the store (+ allow_read), locked."""
        con = self.connect()
        dirs = [str(self.root) + os.sep] + [str(Path(p).absolute()) for p in allow_read]
        quoted = ", ".join("'" + d.replace("'", "''") + "'" for d in dirs)
        con.execute(f"SET allowed_directories = [{quoted}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
        return con

    def read_only_query(self, sql: str, allow_read: Iterable[str | os.PathLike] = ()) -> pa.Table:
        """Run user SQL that may only read: refused statements raise ReplayError."""
        con = self.read_only_connection(allow_read)
        try:
            statements = check_read_only(con, sql)
            if len(statements) > 1:  # read-only queries: the earlier ones could only be thrown away
                raise ReplayError(f"one query at a time: got {len(statements)} statements separated by ';' "
                                  f"(run each with its own `replay sql`, or join them with UNION ALL)")
            return con.sql(statements[-1].query).to_arrow_table()
        except duckdb.Error as exc:
            raise self.query_error(exc) from None
        finally:
            con.close()


# errors of reading data, not of the statement (those are Parser/Binder/Catalog/... subclasses)
_DATA_ERRORS = (duckdb.Error, duckdb.IOException, duckdb.InternalException, duckdb.InvalidInputException)


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split("\n")[:2]).strip()
