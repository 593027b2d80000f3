"""`replay doctor`: check a store's files and the invariants between them, naming each problem's path.

Per-file checks read Parquet footers (schema, row and null counts), cheap; `deep=True` also
decompresses every page, verifies its CRC32 (replay writes page checksums; DuckDB's reader never
checks them, so a flipped byte in a data page reads as wrong numbers, not as an error), and checks
the values learn relies on (`VALUE_CHECKS`: finite logprobs <= 0, token ids inside the vocabulary,
lengths that agree). Cross-file checks (duplicate keys, orphans, group sizes, manifest counts)
run in DuckDB over the files that passed, so a corrupt shard is named once instead of failing every
query. Each current group summary is compared with the rows it summarises. Adapters: safetensors header only (no torch). Leftover temp files are warnings, not errors.
"""

from __future__ import annotations

import json
import math
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
from ..errors import ReplayError
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
    notes: list[str] = field(default_factory=list)  # what a check could not cover (shown in the summary)

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
                + (f"; {warnings} warning(s)" if warnings else "") + "".join(f"; {n}" for n in self.notes))


def check_store(path: str | os.PathLike, deep: bool = False) -> list[Problem]:
    """Every problem found in the store at `path`; empty for a healthy store."""
    return diagnose(path, deep).problems


def diagnose(path: str | os.PathLike, deep: bool = False) -> Diagnosis:
    result = Diagnosis(_store_root(path))  # a directory or an s3:// store
    if not _meta_ok(result) or _unusual(result):
        return result
    good = {table: _table_files(result, table, deep) for table in schemas.TABLES}
    if not deep:  # a corrupt page behind a sound footer reads as numbers: say what was not looked at
        result.notes.append("footers only: --deep reads every page, verifies its checksum and checks the values")
    manifests = _read_manifests(result)
    try:
        with duckdb.connect(":memory:") as con:
            storage_of(result.root).attach(con)
            if not sys.stdout.isatty():  # DuckDB's progress bar goes to stdout: not into logs
                con.execute("SET enable_progress_bar = false")
            for table, files in good.items():
                _register(con, table, files)
            for check in (_keys, _group_sizes, _manifest_counts, _verdict_coverage):
                check(result, con, manifests)
            if deep:
                _value_ranges(result, con)
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
    """Decompress every page, verifying the CRC32 of each that has one (files replay wrote before it
    wrote checksums have none: their pages are only decoded)."""
    try:
        with path.open("rb") as fh, pq.ParquetFile(fh, page_checksum_verification=True) as parquet:
            for i in range(parquet.num_row_groups):
                parquet.read_row_group(i)
    except (pa.ArrowException, OSError, ValueError) as exc:
        if "CRC" in str(exc):
            return f"corrupt data pages: page checksum mismatch, its bytes changed after replay wrote it ({exc})"
        return f"corrupt data pages: {exc}"
    return None


# -- values (--deep) --------------------------------------------------------------------------------
LOGPROB_SLACK = 1e-6  # processed logprobs are <= 0 exactly; float noise of another tool's import
LOGPROB_FLOOR = -1e4  # float32 probabilities underflow near e^-104: no sampled token is this unlikely
_LP, _IDS, _PIDS = "completion_logprobs", "completion_token_ids", "prompt_token_ids"
# each list is aggregated once per row (lp_min, ...: `_LIST_STATS`), the checks read the aggregates
_LIST_STATS = (f"list_min({_LP}) AS lp_min, list_max({_LP}) AS lp_max, list_sum({_LP}) AS lp_sum, len({_LP}) AS "
               f"lp_len, list_min({_IDS}) AS id_min, list_max({_IDS}) AS id_max, len({_IDS}) AS id_len, "
               f"list_min({_PIDS}) AS pid_min, list_max({_PIDS}) AS pid_max")
# (check name, severity, what is wrong, SQL condition over a rollout row and its _LIST_STATS; NULL passes)
VALUE_CHECKS = (
    ("logprob-finite", "error", "a completion logprob is NaN or infinite",
     "isnan(lp_max) OR NOT isfinite(lp_min) OR NOT isfinite(lp_max)"),
    ("logprob-le-0", "error", "a completion logprob is above 0 (a log-probability is <= 0)",
     f"lp_max > {LOGPROB_SLACK} AND isfinite(lp_max)"),
    ("logprob-floor", "warning", f"a completion logprob is below {LOGPROB_FLOOR:g} (no sampled token is that "
     "unlikely; learn's importance ratio would overflow)", f"lp_min < {LOGPROB_FLOOR} AND isfinite(lp_min)"),
    ("token-id-negative", "error", "a prompt or completion token id is negative", "id_min < 0 OR pid_min < 0"),
    ("token-id-vocab", "error", "a prompt or completion token id is outside the vocabulary of {model} "
     "({vocab} tokens)", "id_max >= $vocab OR pid_max >= $vocab"),
    ("lengths", "error", "len(completion_logprobs), len(completion_token_ids) and num_completion_tokens differ",
     "lp_len <> id_len OR num_completion_tokens <> id_len OR (id_len IS NULL) <> (num_completion_tokens IS NULL) "
     "OR (lp_len IS NOT NULL AND id_len IS NULL)"),
    ("sum-logprob", "error", "sum_logprob is not the sum of completion_logprobs",  # non-finite: logprob-finite
     "(abs(sum_logprob - lp_sum) > 1e-3 * greatest(1, abs(sum_logprob)) AND isfinite(lp_sum)) "
     "OR (sum_logprob IS NULL) <> (lp_len IS NULL)"),
)


def _value_ranges(result: Diagnosis, con) -> None:
    """Per file and check: how many rollouts break it, and the first (round, prompt_id, sample_idx)."""
    vocab, model = vocab_of_store(result.root)
    checks = [c for c in VALUE_CHECKS if vocab is not None or c[0] != "token-id-vocab"]
    if vocab is None:
        result.notes.append(f"token ids checked >= 0 only: the vocabulary of {model} is not at hand")
    flags = ", ".join(f"CASE WHEN {sql} THEN '{name}' END" for name, _, _, sql in checks)
    sql = (f"SELECT filename, failed, count(*), min((round, prompt_id, sample_idx)) FROM (SELECT filename, round, "
           f"prompt_id, sample_idx, unnest(list_filter([{flags}], lambda x: x IS NOT NULL)) AS failed FROM (SELECT "
           f"filename, round, prompt_id, sample_idx, num_completion_tokens, sum_logprob, {_LIST_STATS} FROM rollouts)) "
           f"GROUP BY ALL ORDER BY ALL")
    params = {"vocab": vocab} if vocab is not None else {}
    by_name = {c[0]: c for c in checks}
    for filename, name, n, (round, pid, idx) in con.execute(sql, params).fetchall():
        _, severity, what, _ = by_name[name]
        result.add(filename, f"{n} rollout(s) fail value check {name!r}: {what.format(model=model, vocab=vocab)}, "
                             f"e.g. (round {round}, prompt_id {pid}, sample_idx {idx}); the file may be corrupt",
                   severity)


def refuse_corrupt_rows(rows: list[dict], root: Path, model_dir: Path | str | None, logprobs: bool = True) -> None:
    """`learn`'s guard over the rollout rows it selected (DuckDB does not verify page checksums, so a
    corrupt page reads as numbers). First the page checksums of the rollouts parts of their rounds (a
    local store: one more read of those files, ~10 µs of CPU per rollout, docs/BENCHMARKS.md §1d;
    an s3:// store would download them twice, so there only the values are checked); then the values:
    a non-finite or positive logprob, lists of different lengths, a token id outside the model's
    vocabulary refuse the run in one line naming the row. `logprobs`: whether the stored logprobs
    will be used (not under --recompute-old-logprobs)."""
    if not is_remote(root):
        for round in sorted({row["round"] for row in rows}):
            for part in sorted((Path(root) / "rollouts" / f"round={int(round)}").glob("part-*.parquet")):
                if message := _read_pages(part):
                    raise ReplayError(f"{part}: {message}; learn stopped before training on it (`replay doctor "
                                      f"--store {root} --deep` lists every damaged file)")
    vocab = vocab_size(model_dir) if model_dir is not None else None
    for row in rows:
        if problem := _row_problem(row, vocab, logprobs):
            raise ReplayError(f"round {row['round']} prompt {row['prompt_id']} sample {row['sample_idx']}: "
                              f"{problem}: its rollouts file is corrupt or was written by something else; "
                              f"`replay doctor --store {root} --deep` names the file")


def _row_problem(row: dict, vocab: int | None, logprobs: bool) -> str | None:
    values, ids = row.get(_LP), row.get(_IDS)
    if logprobs and values:
        # float32 values cannot overflow a float sum: it is finite exactly when every value is
        if not math.isfinite(sum(values)):
            return f"stored {_LP} holds {next(v for v in values if not math.isfinite(v))} (must be finite)"
        if max(values) > LOGPROB_SLACK:
            return f"stored {_LP} holds {max(values):g} (a log-probability is <= 0)"
        if ids is not None and len(ids) != len(values):
            return f"{len(values)} stored {_LP} for {len(ids)} {_IDS}"
    for key in (_PIDS, _IDS):
        if row.get(key):
            low, high = min(row[key]), max(row[key])
            if low < 0 or (vocab is not None and high >= vocab):
                bad = low if low < 0 else high
                return f"{key} holds {bad}, outside the model's vocabulary" + (f" of {vocab}" if vocab else "")
    return None


def vocab_size(model_dir: Path | str) -> int | None:
    """The model's vocabulary (rows of its embedding) from its config.json; None when it does not say."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    return config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None


def vocab_of_store(root: Path) -> tuple[int | None, str]:
    """(vocabulary size, model name) of the store's base model, if it is on this machine already: a
    local model directory, or an embedded/GGUF model converted before (nothing is loaded or built)."""
    from ..models import EMBEDDED_MODELS, MARKER as MODEL_MARKER, gguf_cache_key, replay_home

    try:
        meta = json.loads((root / STORE_FILE).read_text(encoding="utf-8"))
        model = meta.get("base_model") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        model = None
    if not isinstance(model, str) or not model:
        return None, "the store's model (store.json names none)"
    directory = Path(model).expanduser()
    if model not in EMBEDDED_MODELS and not directory.is_absolute():  # a label (an import's model name)
        return None, repr(model)
    if model in EMBEDDED_MODELS:
        directory = replay_home() / "models" / model
    elif model.lower().endswith(".gguf") and directory.is_file():
        stat = directory.stat()
        directory = replay_home() / "models" / gguf_cache_key(directory.name, stat.st_size, stat.st_mtime_ns)
    if (model in EMBEDDED_MODELS or model.lower().endswith(".gguf")) and not (directory / MODEL_MARKER).is_file():
        return None, repr(model)
    return vocab_size(directory), repr(model)


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


def _verdict_coverage(result: Diagnosis, con, manifests) -> None:
    """A round that was scored (it has a verdict, or a complete score manifest) while some of its rollouts
    have none: written after the score, or beside it (a score run during a generate once recorded 16 of
    48 as complete). A warning, since a late generate or import is a normal state until the next score;
    learn refuses the round until then (unless --partial)."""
    rows = con.execute("SELECT r.round, count(*), count(v.vr), min(r.filename) FILTER (WHERE v.vr IS NULL) "
                       "FROM rollouts r LEFT JOIN (SELECT DISTINCT round AS vr, prompt_id AS vp, sample_idx AS vs "
                       "FROM verdicts) v ON v.vr = r.round AND v.vp = r.prompt_id AND v.vs = r.sample_idx "
                       "GROUP BY r.round HAVING count(v.vr) < count(*) ORDER BY 1").fetchall()
    unreadable = {(p.path.parent.parent.name, p.path.parent.name) for p in result.errors}
    for round, n, scored, file in rows:
        if {("verdicts", f"round={round}"), ("rollouts", f"round={round}")} & unreadable:
            continue  # a file of the round is reported unreadable: what it holds is not counted here
        claims = sorted(stage for (r, stage), record in manifests.items()
                        if r == round and _kind(stage) == "score" and record.get("status") == "complete")
        if not scored and not claims:
            continue  # not scored yet: nothing claims otherwise
        said = (f", though {', '.join(f'{s}.json' for s in claims)} recorded a complete score (rows written "
                f"after it or beside it, or a shard not scored yet)") if claims else ""
        result.add(file, f"round {round}: {n - scored} of its {n} rollouts have no verdict{said}: learn refuses "
                         f"the round until `replay score --round {round}` (every shard) scores them, or is given "
                         f"--partial", "warning")


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
