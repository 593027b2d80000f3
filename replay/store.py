"""The store: a directory of Hive-partitioned Parquet files plus JSON manifests.

Every stage reads and writes the store's tables through this module. Three others touch Parquet or
DuckDB for their own reasons: `read/doctor.py` opens files one by one (it must name a file the
store's views would fail on), `read/formats.py` writes `-o result.parquet`, `datasets.py` reads
input Parquet files. Writes are append-only and atomic
(replay/storage: locally a temp file in the same directory, fsync, rename; on S3 one PUT of the
whole object); rows are never updated in place. Readers only
ever glob `part-*.parquet`, so a half-written `.tmp-*` file is invisible to them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

import schemas

from . import __version__
from .errors import StoreError
from .sqlguard import check_read_only
from .storage import resolve, storage_of
from .storage.local import (  # noqa: F401  (the local write primitives, used by other modules too)
    HOST_TAG, atomic_write_bytes, clean_temp_files, left_by_dead_writer, pid_alive, refusal, temp_name,
    unusual_entries)

if TYPE_CHECKING:  # annotations only: the CLI's read commands run without pyarrow
    import pyarrow as pa

STORE_FILE = "store.json"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def duckdb_type(typ: pa.DataType) -> str:
    import pyarrow as pa  # not at the top: the CLI's read commands run without pyarrow

    if pa.types.is_list(typ):
        return duckdb_type(typ.value_type) + "[]"
    if pa.types.is_timestamp(typ):
        return "TIMESTAMPTZ" if typ.tz else "TIMESTAMP"
    names = {pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
             pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN", pa.string(): "VARCHAR"}
    return names[typ]


def validate(table_name: str, data: pa.Table | Iterable[Mapping]) -> pa.Table:
    """Return `data` as an Arrow table of the table's schema, or raise naming the bad column."""
    import pyarrow as pa

    schema = schemas.arrow_schema(table_name)
    if not isinstance(data, pa.Table):
        rows = list(data)
        # a table's grown (nullable) columns may be left out, as files written before them show NULL
        missing = [f.name for f in schema if rows and f.name not in rows[0]
                   and not (table_name in schemas.GROWN and f.nullable)]
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


# Rollouts carry ~4 KB of token lists and text per row. Dictionary encoding only where values
# repeat and statistics only on scalar columns: the attempts on lists and free text were ~20 % of
# the write's CPU (bench/store_bench.py, docs/BENCHMARKS.md §1); files grow ~5 %.
_REPEATING = ("prompt_id", "finish_reason", "policy_adapter", "base_model", "engine", "engine_version",
              "logprobs_mode")


def _parquet_options(table: str) -> dict:
    if table != "rollouts":
        return {}
    scalar = [c.name for c in schemas.COLUMNS[table] if not c.type.startswith("list<") and c.name != "round"]
    return {"use_dictionary": list(_REPEATING), "write_statistics": scalar}


def _relaxed(schema: pa.Schema) -> pa.Schema:
    import pyarrow as pa

    # from_pylist with nullable fields, so that a NULL is reported by validate() by column name
    return pa.schema([f.with_nullable(True) for f in schema])


def _store_root(path: str | os.PathLike) -> Path:
    """The store's root: a Path, or an S3Path for s3://bucket/prefix (other schemes are refused)."""
    root = resolve(path)
    if any(part.startswith("round=") for part in root.parts):
        # DuckDB's Hive parsing takes the first round=... directory of a path as the rows' round
        raise StoreError(f"{root}: a store may not live inside a directory named round=...")
    if any(c in "*?[]{}" for c in str(root)):
        # DuckDB reads a store by glob patterns built from its path: `s?` would read s1's rows
        raise StoreError(f"{root}: a store path may not contain glob characters (* ? [ ] {{ }}): DuckDB "
                         "would read it as a pattern and match other directories; rename it")
    return root


class Store:
    def __init__(self, root: Path, meta: dict):
        self.root = resolve(root)  # an S3Path below another store's root is re-rooted at itself
        self.meta = meta
        self.storage = storage_of(self.root)  # local directory or S3: see replay/storage

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, base_model: str | None = None) -> "Store":
        root = _store_root(path)
        if (root / STORE_FILE).exists():
            return cls.open(root)
        meta = {"schema_version": schemas.SCHEMA_VERSION, "created_at": utc_now().isoformat(),
                "base_model": base_model, "replay_version": __version__}
        try:
            created = storage_of(root).put_if_absent(root / STORE_FILE, json.dumps(meta, indent=2).encode())
        except OSError as exc:
            raise StoreError(f"cannot create store at {root}: {exc.strerror or exc}") from None
        return cls(root, meta) if created else cls.open(root)  # lost a race: the winner's store.json

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        root = _store_root(path)
        meta_path = root / STORE_FILE
        if not meta_path.exists():
            raise StoreError(f"no replay store at {root} (missing {STORE_FILE}); "
                             "create one with `replay generate` or `replay import`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: broken JSON, and bytes that are not UTF-8
            raise StoreError(f"{meta_path}: unreadable store metadata: {exc}") from None
        if not isinstance(meta, dict):  # `[]`, `null`: valid JSON, but no store's metadata
            raise StoreError(f"{meta_path}: unreadable store metadata: a JSON object expected, found "
                             f"{json.dumps(meta)[:40]}")
        version = meta.get("schema_version")
        if version != schemas.SCHEMA_VERSION:
            raise StoreError(f"{meta_path}: store schema version {version}, this replay reads "
                             f"version {schemas.SCHEMA_VERSION}; use a matching replay release")
        return cls(root, meta)

    # -- paths -----------------------------------------------------------------------------
    def table_dir(self, table: str, round: int | None = None) -> Path:
        if table not in schemas.COLUMNS:
            raise StoreError(f"unknown table {table!r}; tables: {', '.join(schemas.COLUMNS)}")
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

    def adapter_dir(self, round: int, name: str = schemas.MAIN_ADAPTER) -> Path:
        """adapters/round=R for the round's policy; adapters/name=NAME/round=R for A/B variants."""
        if name == schemas.MAIN_ADAPTER:
            return self.root / "adapters" / f"round={int(round)}"
        if not name.replace("-", "").replace("_", "").isalnum():
            raise StoreError(f"adapter name {name!r}: use letters, digits, - and _ only")
        return self.root / "adapters" / f"name={name}" / f"round={int(round)}"

    def refuse_inside(self, path: str | os.PathLike, what: str) -> None:
        """Refuse a user-chosen output path inside the store: only stages write there."""
        if self.storage.remote:
            if str(path).rstrip("/").startswith(str(self.root).rstrip("/")):
                raise StoreError(f"refused: {what} {path} is inside the store {self.root}")
            return
        target = Path(path).absolute().resolve()
        if target.is_relative_to(self.root.resolve()):
            raise StoreError(f"refused: {what} {path} is inside the store {self.root}; "
                             "only replay's stages write there")

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
        try:
            # page checksums (CRC32): `replay doctor --deep` verifies them; DuckDB's reader does not
            self.storage.write_parquet(final, arrow, write_page_checksum=True, **_parquet_options(table))
        except OSError as exc:
            raise StoreError(f"cannot write {final}: {exc.strerror or exc}") from None
        return final

    def write_manifest(self, round: int, stage: str, record: Mapping) -> Path:
        missing = [k for k in schemas.MANIFEST_KEYS if k not in record]
        if missing:
            raise StoreError(f"manifest {stage}: missing key(s) {', '.join(missing)}")
        path = self.manifest_path(round, stage)
        try:
            self.storage.put(path, json.dumps(record, indent=2, default=str).encode())
        except OSError as exc:  # disk full, permission denied: the old manifest (if any) stays intact
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
        if not self.storage.remote:  # an object store has no temp files: a PUT is whole or absent
            clean_temp_files(path.parent)
        return path

    def orphaned_manifest(self, round: int, stage: str) -> dict | None:
        """The newest complete manifest of `stage` that a killed writer left in its temp file: the
        work it describes is stored, only the rename into place never happened."""
        found = []
        for tmp in self.manifest_path(round, stage).parent.glob(".tmp-*.json"):
            parts = tmp.name.split("-", 4)  # .tmp, pid, host, uuid, <stage>.json
            if len(parts) == 5 and parts[4] == f"{stage}.json" and left_by_dead_writer(tmp.name):
                try:
                    record = json.loads(tmp.read_text())
                except (OSError, ValueError):
                    continue  # killed mid-write: half a file
                if isinstance(record, dict) and record.get("status") == "complete" and record.get("stage") == stage:
                    found.append(record)
        return max(found, key=lambda r: str(r.get("finished_at")), default=None)

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
        columns = schemas.COLUMNS[table]
        if table in schemas.PARTITIONED:
            glob = self.root / table / "round=*" / "part-*.parquet"
            exists = any((self.root / table).glob("round=*/part-*.parquet"))
            opts = "hive_partitioning = true, hive_types = {'round': INTEGER}"
        else:
            glob = self.root / table / "part-*.parquet"
            exists = any((self.root / table).glob("part-*.parquet"))
            opts = "union_by_name = false"
        if exists and table in schemas.GROWN:  # small tables that gained columns: older files show NULL
            typed = ", ".join(f'CAST(NULL AS {schemas.DUCKDB_TYPES[c.type]}) AS "{c.name}"' for c in columns)
            path = str(glob).replace("'", "''")
            opts = opts.replace("union_by_name = false", "union_by_name = true")
            names = ", ".join(f'"{c.name}"' for c in columns)
            return (f"SELECT {names} FROM (SELECT {typed} WHERE false "
                    f"UNION ALL BY NAME SELECT * FROM read_parquet('{path}', {opts}))")
        if exists:
            # columns are matched by name; no union_by_name, which reads every file's footer each
            # time a view is bound (seconds of start-up at 10 M rollouts). Every file is written with
            # the table's columns; one that lacks a column fails the query naming it (and doctor).
            cols = ", ".join(f'"{c.name}"' for c in columns)
            path = str(glob).replace("'", "''")
            return f"SELECT {cols} FROM read_parquet('{path}', {opts})"
        # no files yet: an empty relation with the right columns, so every view still binds
        cols = ", ".join(f'CAST(NULL AS {schemas.DUCKDB_TYPES[c.type]}) AS "{c.name}"' for c in columns)
        return f"SELECT {cols} WHERE false"

    def _sample_plans_source(self) -> str:
        """Rescue sampling's and hint sets' plans (prompt-set generate manifests): per round, stage and
        prompt, the first sample_idx the set added, how many (the rows `sample_idx` in that range are
        its), and the set's hint (NULL for plain rescue sampling)."""
        columns = ("round INTEGER, stage VARCHAR, prompt_id VARCHAR, first_sample_idx INTEGER, num_samples INTEGER, "
                   "hint_kind VARCHAR, hint_fraction DOUBLE")
        paths = [p for p in self.root.glob("manifests/round=*/generate.*.json") if not p.name.startswith(".")]
        if not paths:
            return "SELECT " + ", ".join(f"CAST(NULL AS {c.split()[1]}) AS {c.split()[0]}"
                                         for c in columns.split(", ")) + " WHERE false"
        path = str(self.root / "manifests" / "round=*" / "generate.*.json").replace("'", "''")
        return (f"SELECT round, stage, unnest(map_keys(plan)) AS prompt_id, "
                f"unnest(map_values(plan)) AS first_sample_idx, num_samples, hint.kind AS hint_kind, "
                f"hint.fraction AS hint_fraction FROM ("
                f"SELECT round, stage, plan, hint, CAST(config->>'num_samples' AS INTEGER) AS num_samples "
                f"FROM read_json('{path}', columns = {{stage: 'VARCHAR', round: 'INTEGER', "
                f"plan: 'MAP(VARCHAR, INTEGER)', config: 'JSON', hint: 'STRUCT(kind VARCHAR, fraction DOUBLE)'}}, "
                f"hive_partitioning = false) WHERE plan IS NOT NULL)")

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

    def connect(self, threads: int | None = None, names: Iterable[str] | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table and view of the store registered, or
        only those that `names` read (binding a view costs start-up time; `replay sql` needs few).

        CREATE VIEW reads the footer of a table's first file: a damaged file fails here or in the
        query that reads it, both with the hint to run `replay doctor`."""
        from .summary import view_source

        con = duckdb.connect(":memory:")
        try:
            self.storage.attach(con)
            if not sys.stdout.isatty():  # DuckDB draws its bar on stdout: into CSV output, into logs
                con.execute("SET enable_progress_bar = false")
            con.execute("SET parquet_metadata_cache = true")  # views over one file bind once, not per view
            if threads:
                con.execute(f"SET threads = {int(threads)}")
            summary = wanted = None
            if names is not None:
                deps = schemas.dependencies()
                wanted = schemas.needed(set(names), deps)
                if "group_summary" in wanted:
                    summary = view_source(self)
                    if "group_summary_raw" not in summary:  # every round's summary is current
                        wanted = schemas.needed(set(names), deps | {"group_summary": frozenset()})
            for table in (t for t in schemas.COLUMNS if t not in schemas.CACHES):
                if wanted is None or table in wanted:
                    con.execute(f"CREATE VIEW {table} AS {self._source(table)}")
            if wanted is None or "stage_runs" in wanted:
                con.execute(f"CREATE VIEW stage_runs AS {self._stage_runs_source()}")
            if wanted is None or "sample_plans" in wanted:
                con.execute(f"CREATE VIEW sample_plans AS {self._sample_plans_source()}")
            for view in schemas.VIEW_FILES:
                if wanted is None or view in wanted:
                    con.execute(f"CREATE VIEW group_summary AS {summary or view_source(self)}"
                                if view == "group_summary" else schemas.view_sql(view))
        except duckdb.CatalogException as exc:
            con.close()
            if names is None:
                raise self.query_error(exc) from None
            return self.connect(threads)  # a view reads one its dependencies missed: bind them all
        except duckdb.Error as exc:
            con.close()
            raise self.query_error(exc) from None
        return con

    def query_error(self, exc: duckdb.Error) -> StoreError:
        """One line for a failed query. DuckDB names a file whose footer is damaged, not one with a
        corrupt page behind a sound footer: then point at `replay doctor --deep`, which finds it."""
        message = f"query failed: {_first_line(exc)}"
        if "hive partition column" in message and (odd := self._odd_round_dirs()):
            return StoreError(f"{odd[0]}: round {odd[0].name[6:]!r} is not an integer, so no query of its "
                              f"table can run; move it out of the store (`replay doctor` lists every one)")
        if type(exc) in _DATA_ERRORS and str(self.root) not in message:
            message += (f" (a file of the store may be corrupt: `replay doctor --store {self.root} --deep` "
                        "names it)")
        return StoreError(message)

    def _odd_round_dirs(self) -> list[Path]:
        """`<table>/round=X` directories whose X is not an integer (DuckDB fails every read of the table)."""
        return sorted(d for d in self.root.glob("*/round=*") if not d.name[6:].lstrip("-").isdigit())

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        """Trusted, internal query (stages use it); returns an Arrow table."""
        con = self.connect()
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise self.query_error(exc) from None
        finally:
            con.close()

    def read_only_connection(self, allow_read: Iterable[str | os.PathLike] = (),
                             names: Iterable[str] | None = None, memory_limit: str | None = None,
                             max_temp_size: str | None = None) -> duckdb.DuckDBPyConnection:
        """A connection for user SQL: reads confined to the store (+ allow_read), configuration locked;
        only the views that `names` read are bound (all when None); memory and spill space capped
        when given (DuckDB sizes: '2GB'; its defaults are 80 % of RAM and 90 % of free disk).

        DuckDB adds its temp directory to the allowed ones, so each connection gets a private, empty
        one (removed with the connection, or on SIGTERM) instead of `<cwd>/.tmp`."""
        self._refuse_escaping_links()
        con = self.connect(names=names)
        temp = _private_temp_dir()
        weakref.finalize(con, _remove_temp_dir, temp)
        dirs = self.storage.sql_roots() + [str(Path(p).absolute()) for p in allow_read]
        quoted = ", ".join("'" + d.replace("'", "''") + "'" for d in dirs)
        for setting, value in (("memory_limit", memory_limit), ("max_temp_directory_size", max_temp_size)):
            try:
                if value is not None:
                    con.execute(f"SET {setting} = ?", [str(value)])
            except duckdb.Error as exc:
                con.close()
                raise StoreError(f"{setting} {value!r}: {_first_line(exc)} (give a size such as '2GB')") from None
        con.execute("SET temp_directory = ?", [temp])
        con.execute(f"SET allowed_directories = [{quoted}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
        return con

    def _refuse_escaping_links(self) -> None:
        """DuckDB confines paths by their text: a symlink in the store could lead a query elsewhere."""
        if self.storage.remote:  # object stores have no links
            return
        root = self.root.resolve()
        for path, what in unusual_entries(self.root):  # links within the store lead a reader nowhere new
            if not path.is_symlink():  # a FIFO would block the query forever
                raise refusal(path, what)
            if not path.resolve().is_relative_to(root):
                raise StoreError(f"refused: {path} is a symbolic link out of the store "
                                 f"(to {path.resolve()}); remove it to query this store")

    def read_only_query(self, sql: str, allow_read: Iterable[str | os.PathLike] = (), params: list | None = None,
                        fetch=None, timeout: float | None = None, memory_limit: str | None = None,
                        max_temp_size: str | None = None):
        """Run one user query that may only read (sqlguard); `params` bind `?` placeholders; `fetch`
        turns the result relation into what is returned (default: an Arrow table). `timeout`
        (seconds; `replay sql --timeout`) interrupts the query; the limits: read_only_connection.

        Only the views the SQL names are opened; if it reaches another, or lists the catalog (SHOW
        TABLES), every view is."""
        deadline = time.monotonic() + timeout if timeout else None
        for names in (schemas.references(sql), None):
            con = self.read_only_connection(allow_read, names, memory_limit, max_temp_size)
            stopped = threading.Event()
            timer = None
            if deadline is not None:  # interrupt() is the one call DuckDB takes from another thread
                def stop(con=con, stopped=stopped):
                    stopped.set()
                    try:
                        con.interrupt()
                    except duckdb.Error:  # closed meanwhile: the query ended in time
                        pass

                timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop)
                timer.daemon = True
                timer.start()
            try:
                checked = check_read_only(con, sql)
                if checked.lists_catalog and names is not None:
                    continue  # SHOW TABLES, duckdb_views(): bind every view, not only those named
                relation = con.sql(checked.sql, params=params or None)
                if checked.explain:
                    relation = con.sql("SELECT 'physical_plan' AS explain_key, ? AS explain_value",
                                       params=[relation.explain(type=checked.explain)])
                return fetch(relation) if fetch else relation.to_arrow_table()
            except duckdb.Error as exc:
                if stopped.is_set():
                    raise StoreError(f"query stopped after {timeout:g} s (--timeout {timeout:g}; "
                                     "raise it, or 0 for no limit)") from None
                if names is None or not isinstance(exc, duckdb.CatalogException):
                    error = self.query_error(exc)
                    if isinstance(exc, duckdb.OutOfMemoryException) and (memory_limit or max_temp_size):
                        error = StoreError(f"{error} (raise --memory-limit or --max-temp-size)")
                    raise error from None
            finally:
                if timer:
                    timer.cancel()
                con.close()


# errors of reading data, not of the statement (those are Parser/Binder/Catalog/... subclasses)
_DATA_ERRORS = (duckdb.Error, duckdb.IOException, duckdb.InternalException, duckdb.InvalidInputException)


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split("\n")[:2]).strip()


# the private temp directories of open read-only connections: SIGTERM's default action skips the
# finalizers that remove them, so while any is open a handler removes them, then dies of SIGTERM
_LIVE_TEMP_DIRS: set[str] = set()


def _private_temp_dir() -> str:
    if _sigterm_is_ours(signal.SIG_DFL):  # only where SIGTERM would end the process anyway
        signal.signal(signal.SIGTERM, _remove_temp_dirs_and_die)
    temp = tempfile.mkdtemp(prefix="replay-sql-")
    _LIVE_TEMP_DIRS.add(temp)
    return temp


def _remove_temp_dir(temp: str) -> None:
    shutil.rmtree(temp, ignore_errors=True)
    _LIVE_TEMP_DIRS.discard(temp)
    if not _LIVE_TEMP_DIRS and _sigterm_is_ours(_remove_temp_dirs_and_die):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a long stage after `learn --where` keeps the default


def _sigterm_is_ours(handler) -> bool:
    """SIGTERM's handler is `handler`, and this thread may change it (only the main thread may)."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is handler


def _remove_temp_dirs_and_die(signum, frame) -> None:
    for temp in list(_LIVE_TEMP_DIRS):
        shutil.rmtree(temp, ignore_errors=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
