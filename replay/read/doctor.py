"""`replay doctor`: check a store's files and the invariants between them, naming each problem's path.

Per-file checks read Parquet footers (schema, row and null counts), cheap; `deep=True` also
decompresses every page. Cross-file checks (duplicate keys, orphans, group sizes, manifest counts)
run in DuckDB over the files that passed, so a corrupt shard is named once instead of failing every
query. Each current group summary is compared with the rows it summarises. Adapters: safetensors header only (no torch). Leftover temp files are warnings, not errors.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import schemas

from ..adapters import MARKER
from ..storage import is_remote, resolve, storage_of
from ..storage.local import pid_alive, unusual_entries
from ..store import STORE_FILE, _store_root, duckdb_type

EXAMPLES = 5  # duplicate keys listed one per line; the total is always given
# (what, SQL yielding filename, count, example): one problem per file
KEY_CHECKS = (
    ("verdicts without a rollout",
     "SELECT filename, count(*), any_value(format('(round {}, prompt_id {}, sample_idx {})', round, prompt_id, "
     "sample_idx)) FROM verdicts ANTI JOIN rollouts USING (round, prompt_id, sample_idx) GROUP BY 1 ORDER BY 1"),
    ("rollouts whose prompt_id is not in prompts (no gold answer to score)",
     "SELECT filename, count(*), any_value(prompt_id) FROM rollouts ANTI JOIN prompts USING (prompt_id) "
     "GROUP BY 1 ORDER BY 1"),
    ("prompt rows whose prompt_id also names another problem or answer",
     "WITH bad AS (SELECT prompt_id FROM prompts GROUP BY 1 HAVING count(DISTINCT (problem, answer)) > 1) "
     "SELECT filename, count(*), any_value(prompt_id) FROM prompts SEMI JOIN bad USING (prompt_id) "
     "GROUP BY 1 ORDER BY 1"),
)


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {' '.join(self.message.split())}"


@dataclass
class Diagnosis:
    root: Path
    problems: list[Problem] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows in its readable files
    files: int = 0
    manifests: int = 0
    adapters: int = 0
    eval_stores: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def add(self, path: Path | str, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(resolve(path) if isinstance(path, str) else path, message, severity))

    def summary(self) -> str:
        tables = ", ".join(f"{t} {n}" for t, n in self.rows.items() if n) or "no rows"
        warnings = len(self.problems) - len(self.errors)
        return (f"ok: {self.root}: {self.files} Parquet files ({tables}), {self.manifests} manifests, "
                f"{self.adapters} adapters, {self.eval_stores} eval stores"
                + (f"; {warnings} warning(s)" if warnings else ""))


def check_store(path: str | os.PathLike, deep: bool = False) -> list[Problem]:
    """Every problem found in the store at `path`; empty for a healthy store."""
    return diagnose(path, deep).problems


def diagnose(path: str | os.PathLike, deep: bool = False) -> Diagnosis:
    result = Diagnosis(_store_root(path))  # a directory or an s3:// store
    if not _meta_ok(result) or _unusual(result):
        return result
    good = {table: _table_files(result, table, deep) for table in schemas.TABLES}
    manifests = _read_manifests(result)
    try:
        with duckdb.connect(":memory:") as con:
            storage_of(result.root).attach(con)
            if not sys.stdout.isatty():  # DuckDB's progress bar goes to stdout: not into logs
                con.execute("SET enable_progress_bar = false")
            for table, files in good.items():
                _register(con, table, files)
            for check in (_keys, _group_sizes, _manifest_counts):
                check(result, con, manifests)
    except duckdb.Error as exc:  # a page is corrupt behind a sound footer: find the file
        culprits = [(p, m) for files in good.values() for p in files if (m := _read_pages(p))]
        for culprit, message in culprits:
            result.add(culprit, message)
        if not culprits:
            result.add(result.root, f"cross-file checks failed: {exc}")
    _group_summaries(result)
    _adapters(result)
    _temp_files(result)
    for sub in sorted(p.parent for p in (result.root / "evals").glob("*/store.json")):  # eval stores
        result.problems += diagnose(sub, deep).problems
        result.eval_stores += 1
    return result


# -- store.json and single files ----------------------------------------------------------------
def _meta_ok(result: Diagnosis) -> bool:
    """False when nothing else can be judged: no store, or one of another schema version."""
    meta_path = result.root / STORE_FILE
    if not meta_path.is_file():
        result.add(meta_path, "missing: not a replay store")
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        result.add(meta_path, f"unreadable store metadata: {exc}")
        return True  # the files can still be checked against this version's schemas
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != schemas.SCHEMA_VERSION:
        result.add(meta_path, f"schema version {version!r}, this replay reads version {schemas.SCHEMA_VERSION}")
        return False
    return True


def _unusual(result: Diagnosis) -> bool:
    """Each link, FIFO, socket or device in the store (replay makes none, and its write commands refuse
    a store holding one). True if any: then nothing else is read, since a reader would follow the
    link out of the store or block on the FIFO."""
    found = [] if is_remote(result.root) else list(unusual_entries(result.root))
    for path, what in found:
        result.add(path, f"{what}: replay's write commands refuse this store until it is removed "
                         "(nothing else was checked)")
    return bool(found)


def _table_files(result: Diagnosis, table: str, deep: bool) -> list[Path]:
    """The table's part files that open and match its schema (the others are reported)."""
    base, partitioned = result.root / table, table in schemas.PARTITIONED
    expected, bad_dirs = schemas.TABLES[table], set()
    if partitioned:
        expected = expected.remove(expected.get_field_index("round"))  # lives in the directory name
        bad_dirs = {d for d in base.glob("round=*") if not d.name[6:].lstrip("-").isdigit()}
    for directory in sorted(d for d in bad_dirs if any(d.glob("part-*.parquet"))):
        result.add(directory, f"round {directory.name[6:]!r} is not an integer: every query of {table} fails")
    good, rows = [], 0
    for path in sorted(base.glob("round=*/part-*.parquet" if partitioned else "part-*.parquet")):
        result.files += 1
        if path.parent in bad_dirs:
            continue
        message, n = _file_problem(path, expected, partitioned, table in schemas.GROWN)
        message = message or (_read_pages(path) if deep else None)
        if message:
            result.add(path, message)
        else:
            good.append(path)
            rows += n
    result.rows[table] = rows
    return good


def _file_problem(path: Path, expected: pa.Schema, partitioned: bool, grown: bool = False) -> tuple[str | None, int]:
    try:
        with path.open("rb") as fh, pq.ParquetFile(fh) as parquet:  # a local file or an S3 object
            schema, meta = parquet.schema_arrow, parquet.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"unreadable Parquet file (truncated or corrupt): {exc}", 0
    in_file = partitioned and "round" in schema.names
    wrong = ["has a 'round' column (it belongs in the directory name)"] if in_file else []
    # a grown table's files written before a nullable column existed lack it (the store reads NULL)
    missing = [f.name for f in expected if f.name not in schema.names and not (grown and f.nullable)]
    extra = [n for n in schema.names if n not in expected.names and n != "round"]
    wrong += [f"missing column(s) {', '.join(missing)}"] if missing else []
    wrong += [f"unknown column(s) {', '.join(extra)}"] if extra else []
    wrong += [f"column {f.name} is {schema.field(f.name).type}, expected {f.type}"
              for f in expected if f.name in schema.names and not schema.field(f.name).type.equals(f.type)]
    if wrong:
        return "schema mismatch: " + "; ".join(wrong), 0
    required = {f.name for f in expected if not f.nullable}
    nulls = sorted({column.path_in_schema for g in range(meta.num_row_groups)
                    for column in (meta.row_group(g).column(c) for c in range(meta.num_columns))
                    if column.path_in_schema in required and column.statistics is not None
                    and column.statistics.has_null_count and column.statistics.null_count})
    if nulls:
        return f"NULLs in required column(s) {', '.join(nulls)}", 0
    return None, meta.num_rows


def _read_pages(path: Path) -> str | None:
    try:
        with path.open("rb") as fh, pq.ParquetFile(fh) as parquet:
            for i in range(parquet.num_row_groups):
                parquet.read_row_group(i)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"corrupt data pages: {exc}"
    return None


# -- cross-file checks (DuckDB) -----------------------------------------------------------------
def _register(con: duckdb.DuckDBPyConnection, table: str, files: list[Path]) -> None:
    if not files:  # an empty relation of the same columns, so every check still binds
        cols = [f'CAST(NULL AS {duckdb_type(f.type)}) AS "{f.name}"' for f in schemas.TABLES[table]]
        con.execute(f"CREATE VIEW {table} AS SELECT {', '.join(cols)}, NULL::VARCHAR AS filename WHERE false")
        return
    listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files)
    hive = ", hive_partitioning = true, hive_types = {'round': INTEGER}" if table in schemas.PARTITIONED else ""
    hive += ", union_by_name = true" if table in schemas.GROWN else ""  # older files lack grown columns
    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listed}], filename = true{hive})")


def _keys(result: Diagnosis, con, manifests) -> None:
    for table, key in schemas.KEYS.items():
        _duplicate_keys(result, con, table, key)
    for what, sql in KEY_CHECKS:
        for filename, n, example in con.execute(sql).fetchall():
            result.add(filename, f"{n} {what}, e.g. {example}")


def _duplicate_keys(result: Diagnosis, con, table: str, key: tuple[str, ...]) -> None:
    # keys first, file names for the few duplicates only (a list() per key over all rows is 4x slower)
    cols = ", ".join(key)
    rows = con.execute(f"WITH dup AS (SELECT {cols}, count(*) OVER () AS total FROM {table} GROUP BY ALL "
                       f"HAVING count(*) > 1 ORDER BY ALL LIMIT ?) SELECT {cols}, list(filename ORDER BY filename), "
                       f"any_value(total) FROM dup JOIN {table} "
                       f"USING ({cols}) GROUP BY ALL ORDER BY ALL", [EXAMPLES]).fetchall()
    for *values, files, total in rows:
        others = ", ".join(sorted(set(files[1:]) - {files[0]})) or "the same file"
        named = ", ".join(f"{name} {value}" for name, value in zip(key, values))
        # the views read one row per prompt_id; rows that disagree are an error of KEY_CHECKS
        severity = "warning" if table == "prompts" else "error"
        result.add(files[0], f"duplicate {table} key ({named}): {len(files)} rows, also in {others} "
                             f"({total} duplicate keys in all)", severity)


def _group_sizes(result: Diagnosis, con, manifests) -> None:
    """Every group of a round has the generate manifest's num_samples, else the round's usual size;
    a prompt that a prompt-set run (`generate --prompts`) planned has exactly the size its plan says."""
    planned = _planned_sizes(manifests)
    con.register("planned", pa.Table.from_pylist(planned, schema=_PLANNED))
    by_round: dict[int, Counter] = {}
    for round, n, groups in con.execute("SELECT round, n, count(*) FROM (SELECT round, prompt_id, count(DISTINCT "
                                        "sample_idx) AS n FROM rollouts ANTI JOIN planned USING (round, prompt_id) "
                                        "GROUP BY ALL) GROUP BY ALL").fetchall():
        by_round.setdefault(round, Counter())[n] = groups
    for round, sizes in sorted(by_round.items()):
        stated = [(stage, r["config"]["num_samples"]) for (r_, stage), r in sorted(manifests.items())
                  if r_ == round and _kind(stage) == "generate" and isinstance(r["config"], dict)
                  and isinstance(r["config"].get("num_samples"), int) and "plan" not in r]
        # without a generate manifest: the commonest size, the larger on a tie (losses shrink groups)
        stage, expected = stated[0] if stated else (None, max(sizes, key=lambda n: (sizes[n], n)))
        source = f"manifests/round={round}/{stage}.json" if stage else "most groups of the round"
        severity = "warning" if not stated and (round, "import") in manifests else "error"  # imports vary
        for n, groups in sorted(sizes.items()):
            if n != expected:
                sql = ("SELECT prompt_id, min(filename) FROM rollouts ANTI JOIN planned USING (round, prompt_id) "
                       "WHERE round = ? GROUP BY 1 HAVING count(DISTINCT sample_idx) = ? ORDER BY 1 LIMIT 1")
                pid, file = con.execute(sql, [round, n]).fetchone()
                result.add(file, f"round {round}: {groups} group(s) of {n} samples, {source} says {expected} "
                                 f"(e.g. prompt_id {pid})", severity)
    off_plan = con.execute("SELECT p.round, p.prompt_id, p.size, p.stage, p.complete, count(DISTINCT r.sample_idx), "
                           "min(r.filename) FROM planned p LEFT JOIN rollouts r USING (round, prompt_id) GROUP BY ALL "
                           "HAVING count(DISTINCT r.sample_idx) <> p.size ORDER BY ALL LIMIT ?", [EXAMPLES]).fetchall()
    for round, pid, size, stage, complete, n, file in off_plan:
        where = file or result.root / "manifests" / f"round={round}" / f"{stage}.json"
        if complete:
            result.add(where, f"round {round}: prompt_id {pid} has {n} samples, its plan in {stage}.json says {size}")
        else:
            result.add(where, f"round {round}: prompt_id {pid} has {n} of the {size} samples {stage} planned: "
                              "that run did not finish; rerun the same command", "warning")


_PLANNED = pa.schema([("round", pa.int32()), ("prompt_id", pa.string()), ("size", pa.int64()),
                      ("stage", pa.string()), ("complete", pa.bool_())])


def _planned_sizes(manifests) -> list[dict]:
    """(round, prompt_id) -> the group size prompt-set runs planned: the largest start + K of its plans."""
    sizes: dict[tuple[int, str], dict] = {}
    for (round, stage), record in sorted(manifests.items()):
        plan, config = record.get("plan"), record.get("config")
        if _kind(stage) != "generate" or not isinstance(plan, dict) or not isinstance(config, dict):
            continue
        for pid, start in plan.items():
            size = int(start) + int(config.get("num_samples", 0))
            if size >= sizes.get((round, pid), {}).get("size", -1):
                sizes[(round, pid)] = dict(round=round, prompt_id=pid, size=size, stage=stage,
                                           complete=record.get("status") == "complete")
    return list(sizes.values())


def _kind(stage: str) -> str:
    """generate.shard-0-of-4 -> generate, eval-score -> score, learn.grpo -> learn."""
    return stage.split(".")[0].removeprefix("eval-")


# -- manifests --------------------------------------------------------------------------------------
def _read_manifests(result: Diagnosis) -> dict[tuple[int, str], dict]:
    """Well-formed manifests by (round, stage); malformed ones are reported and left out."""
    found = {}
    for path in sorted((result.root / "manifests").glob("*/*.json")):
        if path.name.startswith(".tmp-"):
            continue
        result.manifests += 1
        try:
            round = int(path.parent.name.removeprefix("round="))
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            result.add(path, f"corrupt manifest (or not under manifests/round=R): {exc}")
            continue
        missing = [k for k in schemas.MANIFEST_KEYS if k not in record] if isinstance(record, dict) else ["all"]
        if missing:
            result.add(path, f"manifest lacks key(s) {', '.join(missing)} of {', '.join(schemas.MANIFEST_KEYS)}")
        elif record["round"] != round or record["stage"] != path.stem:
            result.add(path, f"manifest of stage {record['stage']!r} round {record['round']!r} at the path of "
                             f"{path.stem!r} round {round}")
        else:
            found[(round, path.stem)] = record
    return found


def _manifest_counts(result: Diagnosis, con, manifests) -> None:
    """A complete stage's recorded counts must still be backed by the files."""
    groups = dict(con.execute("SELECT round, count(DISTINCT prompt_id) FROM rollouts GROUP BY 1").fetchall())
    scored = dict(con.execute("SELECT round, count(*) FROM rollouts SEMI JOIN verdicts "
                              "USING (round, prompt_id, sample_idx) GROUP BY 1").fetchall())
    for (round, stage), record in sorted(manifests.items()):
        counts = record["counts"] if isinstance(record["counts"], dict) else {}
        path, kind = result.root / "manifests" / f"round={round}" / f"{stage}.json", _kind(stage)
        # (recorded count, what the files hold now, of what): the files may hold more, never fewer
        floors = {"generate": ("prompts", groups), "import": ("prompts", groups), "score": ("rollouts", scored)}
        if record["status"] == "complete" and kind in floors and isinstance(counts.get(floors[kind][0]), int):
            key, held = floors[kind]
            if held.get(round, 0) < counts[key]:
                result.add(path, f"complete {stage} recorded {counts[key]} {key}, but the files of round {round} "
                                 f"hold {held.get(round, 0)} {'groups' if key == 'prompts' else 'scored rollouts'}")
        elif record["status"] == "complete" and kind == "learn":
            name = schemas.adapter_of_learn_stage(stage)
            adapter = result.root / "adapters" / ("" if name == schemas.MAIN_ADAPTER else f"name={name}") / f"round={round}"
            if not adapter.is_dir():
                result.add(path, f"complete {stage}, but its adapter directory {adapter} is missing")
            for table, key in (("learn_audit", "samples"), ("learn_metrics", "optimizer_steps")):
                have = con.execute(f"SELECT count(*) FROM {table} WHERE round = ? AND adapter_name = ?",
                                   [round, name]).fetchone()[0]
                if isinstance(counts.get(key), int) and have != counts[key]:
                    result.add(path, f"complete {stage} recorded {counts[key]} {key}, but {table} holds {have} "
                                     f"rows of round {round}, adapter {name}")


def _group_summaries(result: Diagnosis) -> None:
    """A current group summary must equal the aggregation of its round's rows (replay/summary.py)."""
    from .. import summary
    from ..store import Store, StoreError

    try:
        problems = summary.check(Store.open(result.root))
    except (StoreError, duckdb.Error):  # unreadable files: the checks above name them
        return
    for path, message, severity in problems:
        result.add(path, message, severity)


# -- adapters and leftovers -------------------------------------------------------------------------
def _adapters(result: Diagnosis) -> None:
    """Each adapters/round=R (and name=N/round=R) must load: peft config, weights; manifest expected."""
    base = result.root / "adapters"
    for directory in sorted(d for d in [*base.glob("round=*"), *base.glob("name=*/round=*")] if d.is_dir()):
        result.adapters += 1
        config = directory / MARKER
        try:
            record = json.loads(config.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or "peft_type" not in record:
                result.add(config, "not a peft adapter config (no peft_type): the adapter cannot load")
        except (OSError, ValueError) as exc:
            result.add(config, f"unreadable adapter config, the adapter cannot load: {exc}")
        weights = directory / "adapter_model.safetensors"
        if message := _safetensors_problem(weights):
            result.add(weights, message)
        if not (directory / "manifest.json").is_file():
            result.add(directory / "manifest.json", "missing: the adapter's training record is lost", "warning")


def _safetensors_problem(path: Path) -> str | None:
    """Header and offsets only (safetensors checks they cover the file exactly); no torch."""
    from safetensors import SafetensorError, safe_open

    if is_remote(path):  # safetensors opens local files: check a downloaded copy
        import tempfile

        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            return "missing: the adapter has no weights"
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
            tmp.write(payload)
            tmp.flush()
            return _safetensors_problem(Path(tmp.name))
    try:
        with safe_open(str(path), framework="numpy") as weights:
            return None if list(weights.keys()) else "no tensors in the file"
    except (SafetensorError, OSError) as exc:
        return f"unreadable safetensors file (truncated or corrupt): {exc}"


def _temp_files(result: Diagnosis) -> None:
    """`.tmp-<pid>-*` left by a writer that died: invisible to readers, safe to delete.
    An s3:// store has none (its objects are single PUTs, which leave nothing when they fail), but
    another tool's multipart upload that died leaves invisible parts that are billed until aborted."""
    if is_remote(result.root):
        for upload in result.root.storage.incomplete_uploads():
            result.add(f"s3://{result.root.storage.bucket}/{upload['Key']}",
                       f"incomplete multipart upload {upload['UploadId'][:16]}… started {upload['Initiated']}: "
                       "invisible to readers; abort it (or set a lifecycle rule that does)", "warning")
        return
    for directory, subdirs, names in os.walk(result.root):
        for name in [n for n in (*subdirs, *names) if n.startswith(".tmp-")]:
            pid = name.split("-")[1]
            if not (pid.isdigit() and pid_alive(int(pid))):
                result.add(Path(directory) / name, f"left by pid {pid or '?'}, not running on this machine: "
                                                   "safe to delete unless a writer elsewhere owns it", "warning")
        subdirs[:] = [d for d in subdirs if not d.startswith(".tmp-") and Path(directory, d) != result.root / "evals"]
