"""Bad input through the CLI: each case exits non-zero with one `error:` line naming the key detail,
no traceback, and nothing written to the store. Also full disks and refused writes."""

import errno
import hashlib
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from replay.store import Store
from tests._cli import invoke
from tests._tiny_model import save_tiny_model

GOOD = {"problem": "w1 w2 w3", "answer": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def store(tmp_path):
    return Store.create(tmp_path / "store", base_model=None)


def snapshot(root):
    """Every data file's hash; `.locks/` holds only the (empty) lock files of stages that ran."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".locks" not in p.parts} if root.exists() else None


def fails_cleanly(result, *details, progress_before=False):
    """Exit != 0 through the CLI's error policy: one `error:` line holding every detail, and nothing
    else printed (but progress bars, when the failure comes after the model loaded)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and (progress_before or len(lines) == 1), result.output
    assert "Traceback" not in result.output
    for detail in details:
        assert str(detail) in lines[-1]
    return lines[-1]


def generate(store, model_dir, *extra):
    return invoke("generate", "--store", store, "--model", model_dir, "--engine", "transformers", "-G", 2,
                  "--max-new-tokens", 3, *extra)


def write_lines(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode()
                                for line in lines) + b"\n")
    return path


JSONL_CASES = {
    "broken line 3": ([GOOD, GOOD | {"problem": "w4"}, b'{"problem": "w5", "answer"'],
                      ["line 3", "not valid JSON"]),
    "no problem": ([GOOD, {"answer": "2"}], ["line 2", "missing field 'problem'"]),
    "no answer": ([GOOD, {"problem": "w9"}], ["line 2", "missing field 'answer'"]),
    "empty problem": ([{"problem": " \t", "answer": "1"}], ["line 1", "field 'problem' is empty"]),
    "problem not text": ([{"problem": {"text": "w1"}, "answer": "1"}], ["line 1", "must be text, got dict"]),
    "not utf-8": ([GOOD, b'{"problem": "caf\xe9", "answer": "1"}'], ["line 2", "not UTF-8"]),
    "duplicate ids": ([GOOD | {"unique_id": "a"}, {"problem": "w7", "answer": "2", "unique_id": "a"}],
                      ["line 2", "duplicate unique_id 'a'"]),
    "not an object": ([GOOD, [1, 2]], ["line 2", "expected a JSON object"]),
    "integer too long": ([GOOD, b'{"problem": "w1", "answer": ' + b"9" * 5000 + b"}"], ["line 2", "not valid JSON"]),
    "surrogate in a field name": ([b'{"\\ud800": "w1", "answer": "1"}'], ["line 1", "missing field", "\\ud800"]),
    "bad level": ([GOOD | {"level": "hard"}], ["line 1", "field 'level' must be an integer"]),
    "gsm8k without marker": ([{"question": "w1?", "answer": "about 3"}], ["line 1", "no final '#### N'"]),
    "null problem": ([GOOD, {"problem": None, "answer": "2"}], ["line 2", "field 'problem' is null"]),
    "NaN gold": ([GOOD, b'{"problem": "w2", "answer": NaN}'], ["line 2", "field 'answer' is nan"]),
    "Infinity gold": ([b'{"problem": "w2", "answer": Infinity}'], ["line 1", "field 'answer' is inf"]),
    "-Infinity gold": ([b'{"problem": "w2", "answer": -Infinity}'], ["line 1", "field 'answer' is -inf"]),
    "same problem, other gold": ([GOOD, {"problem": "w4", "answer": "2"}, GOOD | {"answer": "7"}],
                                 ["line 3", "the problem of", "line 1 again", "'7' here but '1' there"]),
}


@pytest.mark.parametrize("case", JSONL_CASES)
def test_bad_jsonl_names_file_and_line_and_writes_nothing(store, model_dir, tmp_path, case):
    lines, details = JSONL_CASES[case]
    path = write_lines(tmp_path / "data.jsonl", lines)
    before = snapshot(store.root)
    fails_cleanly(generate(store.root, model_dir, "--dataset", path), path, *details)
    assert snapshot(store.root) == before
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 0}]


def test_the_same_problem_with_the_same_gold_twice_is_one_prompt(store, model_dir, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, {"problem": "w4", "answer": "2"}, GOOD])
    result = generate(store.root, model_dir, "--dataset", path)
    assert result.exit_code == 0, result.output
    assert store.query("SELECT count(*) AS n FROM prompts").to_pylist() == [{"n": 2}]


@pytest.mark.parametrize("words", [250, 50_000_000 // 3])
def test_a_prompt_longer_than_the_context_is_refused_before_any_write(model_dir, tmp_path, words):
    # the tiny model's context is 256 tokens; the second case is the 50 MB single-line problem
    path = write_lines(tmp_path / "data.jsonl", [GOOD, {"problem": "w1 " * words, "answer": "1"}])
    result = generate(tmp_path / "fresh", model_dir, "--dataset", path, "--max-new-tokens", 8)
    fails_cleanly(result, f"prompt 2 of {path}", "does not fit the model's context of 256 tokens",
                  f"{words + 21:,} tokens" if words < 1000 else f"{3 * words - 1:,} characters")  # 21: chat template
    assert not (tmp_path / "fresh").exists()


def test_a_prompt_that_fits_only_without_the_completion_budget_is_refused(model_dir, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [{"problem": "w1 " * 200, "answer": "1"}])  # 221 tokens
    fails_cleanly(generate(tmp_path / "fresh", model_dir, "--dataset", path, "--max-new-tokens", 64),
                  "with --max-new-tokens 64 it does not fit")
    assert generate(tmp_path / "fresh", model_dir, "--dataset", path, "--max-new-tokens", 2).exit_code == 0


def test_bad_dataset_does_not_create_a_new_store(model_dir, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, GOOD, b"{"])
    fails_cleanly(generate(tmp_path / "fresh", model_dir, "--dataset", path), "line 3")
    assert not (tmp_path / "fresh").exists()


PARQUET_CASES = {
    "problem is a list": (pa.table({"problem": [[1, 2]], "answer": ["1"]}), ["row 1", "'problem' must be text"]),
    "answer is a struct": (pa.table({"problem": ["w1"], "answer": [{"a": 1}]}), ["row 1", "'answer' must be text"]),
    "no answer column": (pa.table({"problem": ["w1"]}), ["row 1", "missing field 'answer'"]),
    "null problem": (pa.table({"problem": pa.array([None], pa.string()), "answer": ["1"]}),
                     ["row 1", "field 'problem' is null"]),
    "float NaN gold": (pa.table({"problem": ["w1", "w2"], "answer": [1.0, float("nan")]}),
                       ["row 2", "field 'answer' is nan, not a finite number"]),
    "level is text": (pa.table({"problem": ["w1"], "answer": ["1"], "level": ["x"]}), ["row 1", "'level'"]),
}


@pytest.mark.parametrize("case", PARQUET_CASES)
def test_bad_parquet_dataset(store, model_dir, tmp_path, case):
    table, details = PARQUET_CASES[case]
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    before = snapshot(store.root)
    fails_cleanly(generate(store.root, model_dir, "--dataset", path), path, *details)
    assert snapshot(store.root) == before


def test_unreadable_missing_empty_or_unknown_dataset_files(store, model_dir, tmp_path):
    before = snapshot(store.root)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 but not really")
    fails_cleanly(generate(store.root, model_dir, "--dataset", fake), fake, "not a readable Parquet file")
    fails_cleanly(generate(store.root, model_dir, "--dataset", tmp_path / "absent.jsonl"), "absent.jsonl: no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    fails_cleanly(generate(store.root, model_dir, "--dataset", empty), empty, "no rows")
    fails_cleanly(generate(store.root, model_dir, "--dataset", tmp_path / "data.csv"), "unknown dataset")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("flags, detail", [
    (["--num-samples", 0], "--num-samples must be at least 1, got 0"),
    (["--shard", "3/2"], "--shard 3/2: need 0 <= i < n"),
    (["--shard", "half"], "--shard must look like i/n"),
    (["--max-new-tokens", 0], "--max-new-tokens must be at least 1"),
    (["--temperature", -1], "temperature must be >= 0"),
    (["--top-p", 0], "top_p must be in (0, 1]"),
    (["--num-prompts", -3], "--num-prompts must be at least 1"),
    (["--levels", "9"], "levels must be among 1-5"),
    (["--levels", "one"], "--levels must be comma-separated integers"),
])
def test_bad_generate_flags(store, model_dir, flags, detail):
    before = snapshot(store.root)
    fails_cleanly(generate(store.root, model_dir, "--num-prompts", 2, *flags), detail)
    assert snapshot(store.root) == before


def test_unknown_model_and_model_without_tokenizer(store, model_dir, tmp_path):
    before = snapshot(store.root)
    fails_cleanly(generate(store.root, "no-such-model"), "unknown model 'no-such-model'")
    bare = shutil.copytree(model_dir, tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    fails_cleanly(generate(store.root, bare), "is missing a tokenizer")
    assert snapshot(store.root) == before


def test_store_of_another_schema_version_is_refused(store, model_dir):
    meta = store.root / "store.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"schema_version": schemas.SCHEMA_VERSION + 7}))
    before = snapshot(store.root)
    fails_cleanly(generate(store.root, model_dir), f"schema version {schemas.SCHEMA_VERSION + 7}")
    for args in (["sql", "select 1"], ["status"], ["score"], ["inspect", "rounds"]):
        fails_cleanly(invoke(*args, "--store", store.root), "schema version")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("args", [["sql", "select 1"], ["inspect", "rounds"], ["inspect", "negatives"],
                                  ["status"], ["score"], ["learn"]])
def test_read_commands_need_an_existing_store(tmp_path, args):
    missing = tmp_path / "missing"
    fails_cleanly(invoke(*args, "--store", missing), f"no replay store at {missing}")
    assert not missing.exists()


IMPORT_GOOD = {"problem": "1+1?", "answer": "2", "completion": "\\boxed{2}"}


@pytest.mark.parametrize("lines, details", [
    ([IMPORT_GOOD, b"{oops"], ["line 2", "not valid JSON"]),
    ([IMPORT_GOOD, {"problem": "1+1?", "answer": "2"}], ["line 2", "field 'completion' must be text"]),
    ([IMPORT_GOOD, IMPORT_GOOD | {"answer": "3"}], ["line 2", "gold '3' here but '2' earlier"]),
    ([IMPORT_GOOD | {"completion_token_ids": [1], "completion_logprobs": [0.5]}], ["line 1", "must be <= 0"]),
    ([IMPORT_GOOD | {"completion_logprobs": [-0.5]}], ["line 1", "needs completion_token_ids"]),
    ([IMPORT_GOOD | {"sample_idx": 0}, IMPORT_GOOD | {"sample_idx": 0}], ["line 2", "duplicate sample 0"]),
])
def test_import_with_a_broken_row_writes_nothing(store, tmp_path, lines, details):
    path = write_lines(tmp_path / "done.jsonl", lines)
    before = snapshot(store.root)
    fails_cleanly(invoke("import", path, "--store", store.root), path, *details)
    assert snapshot(store.root) == before
    fails_cleanly(invoke("import", path, "--store", tmp_path / "fresh"), path)
    assert not (tmp_path / "fresh").exists()


# -- inputs that once escaped the readers' validation -------------------------------------------------
def test_lone_surrogate_in_a_problem(store, model_dir, tmp_path):
    # JSON's '\ud800' escape decodes to a lone surrogate: no UTF-8 encoder (hash, Parquet) takes it
    path = write_lines(tmp_path / "data.jsonl", [b'{"problem": "w1 \\ud800", "answer": "1"}'])
    fails_cleanly(generate(store.root, model_dir, "--dataset", path), "line 1")


def test_level_beyond_int32(store, model_dir, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD | {"level": 2**40}])
    before = snapshot(store.root)
    fails_cleanly(generate(store.root, model_dir, "--dataset", path), "line 1", "level")
    assert snapshot(store.root) == before


def test_deeply_nested_json_line(store, model_dir, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [b"[" * 100_000])
    fails_cleanly(generate(store.root, model_dir, "--dataset", path), "line 1")


@pytest.mark.parametrize("extra", [
    {"sample_idx": "first"},
    {"sample_idx": [0]},
    {"sample_idx": 2**40},  # beyond int32: once failed at the rollouts write, after the prompts
    {"completion_token_ids": [1], "completion_logprobs": [float("nan")]},  # NaN > 0 is False
    {"completion": "\ud800"},  # a lone surrogate: once failed at the write, after the prompts
])
def test_import_rows_that_escape_validation(store, tmp_path, extra):
    path = tmp_path / "done.jsonl"
    path.write_text(json.dumps(IMPORT_GOOD | extra) + "\n")
    before = snapshot(store.root)
    fails_cleanly(invoke("import", path, "--store", store.root), "line 1")
    assert snapshot(store.root) == before


def test_sql_over_a_truncated_shard_is_one_line_naming_the_file(store, tmp_path):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD, IMPORT_GOOD | {"completion": "3"}])
    assert invoke("import", path, "--store", store.root).exit_code == 0
    (shard,) = store.files("rollouts", 0)
    shard.write_bytes(shard.read_bytes()[:64])
    fails_cleanly(invoke("sql", "select count(*) from rollouts", "--store", store.root), shard)
    # a query that reads no rollouts binds no rollout view: the damaged file does not block it
    assert invoke("sql", "select count(*) from prompts", "--store", store.root, "-f", "csv").output.split() == [
        '"count(*)"', "1"]


@pytest.mark.parametrize("args", [["inspect", "rounds"], ["inspect", "negatives"], ["status"], ["score"],
                                  ["export", "--out", "{tmp}/out.jsonl"], ["report", "--out", "{tmp}/report"]])
def test_other_commands_over_a_truncated_shard_name_the_file(store, tmp_path, args):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD, IMPORT_GOOD | {"completion": "3"}])
    assert invoke("import", path, "--store", store.root).exit_code == 0
    (shard,) = store.files("rollouts", 0)
    shard.write_bytes(shard.read_bytes()[:64])
    before = snapshot(store.root)
    fails_cleanly(invoke(*[a.format(tmp=tmp_path) for a in args], "--store", store.root), shard)
    assert snapshot(store.root) == before


# -- full disk, refused writes -----------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_write_then_no_space(table, where, **kwargs):
    with open(where, "wb") as fh:
        fh.write(b"PAR1 half a file")
    no_space()


def part_and_temp_files(root):
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", "part-"))]


def test_disk_full_during_import_leaves_no_partial_file(store, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])
    monkeypatch.setattr(pq, "write_table", half_write_then_no_space)
    fails_cleanly(invoke("import", path, "--store", store.root), "No space left on device")
    assert part_and_temp_files(store.root) == []


def test_disk_full_during_generate_leaves_no_rollout_file(store, model_dir, tmp_path, monkeypatch):
    real = pq.write_table

    def rollouts_disk_full(table, where, **kwargs):
        if "rollouts" in str(where):
            half_write_then_no_space(table, where)
        real(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", rollouts_disk_full)
    line = fails_cleanly(generate(store.root, model_dir, "--num-prompts", 1, "--levels", "1"),
                         "No space left on device", progress_before=True)
    assert "rollouts" in line
    assert not (store.root / "rollouts").exists() or part_and_temp_files(store.root / "rollouts") == []
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 0}]


def test_permission_denied_on_rename_is_one_line(store, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", denied)
    monkeypatch.setattr(os, "link", denied)  # store.json is created by link(2): once, whole
    fails_cleanly(invoke("import", path, "--store", store.root), "Permission denied")
    fails_cleanly(invoke("import", path, "--store", tmp_path / "new"), "cannot create store", "Permission denied")
    monkeypatch.undo()
    assert part_and_temp_files(store.root) == [] and part_and_temp_files(tmp_path / "new") == []


def test_disk_full_at_the_manifest_write_is_one_line(store, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])
    real = os.replace

    def manifest_disk_full(src, dst):
        if str(dst).endswith(".json"):
            no_space()
        real(src, dst)

    monkeypatch.setattr(os, "replace", manifest_disk_full)
    fails_cleanly(invoke("import", path, "--store", store.root), "No space left on device")


# -- issue 24 §4: tracebacks that became one line -----------------------------------------------------
def imported_store(store, tmp_path):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD, IMPORT_GOOD | {"completion": "3"}])
    assert invoke("import", path, "--store", store.root).exit_code == 0
    return store


@pytest.mark.parametrize("plant", ["zero-length part", "not Parquet", "random bytes"])
@pytest.mark.parametrize("args", [["status"], ["inspect", "rounds"], ["sql", "select count(*) from rollouts"]])
def test_read_commands_over_a_part_that_is_no_parquet_file(store, tmp_path, plant, args):
    imported_store(store, tmp_path)
    part = store.table_dir("rollouts", 0) / "part-planted.parquet"
    part.write_bytes({"zero-length part": b"", "not Parquet": b"hello, this is no parquet file\n",
                      "random bytes": os.urandom(4096)}[plant])
    before = snapshot(store.root)
    fails_cleanly(invoke(*args, "--store", store.root), part)
    assert snapshot(store.root) == before


@pytest.mark.parametrize("args", [["status"], ["inspect", "rounds"], ["score"], ["sql", "select round from rollouts"]])
def test_a_round_directory_that_is_no_integer_is_named(store, tmp_path, args):
    imported_store(store, tmp_path)
    odd = store.root / "rollouts" / "round=abc"
    shutil.copytree(store.table_dir("rollouts", 0), odd)
    before = snapshot(store.root)
    fails_cleanly(invoke(*args, "--store", store.root), odd, "round 'abc' is not an integer")
    assert snapshot(store.root) == before


@pytest.mark.parametrize("meta", [b"[]", b"null", b"42", b'"store"', b"\xff\xfe{}"])
@pytest.mark.parametrize("args", [["status"], ["sql", "select 1"], ["score"], ["learn"]])
def test_store_json_that_is_no_object(store, meta, args):
    (store.root / "store.json").write_bytes(meta)
    before = snapshot(store.root)
    fails_cleanly(invoke(*args, "--store", store.root), store.root / "store.json", "unreadable store metadata")
    assert snapshot(store.root) == before


# every writer's first write is its lock file: a full or read-only file system fails there
def lock_open_fails(code, monkeypatch):
    real = os.open

    def fake(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "the file system is full"),
                                        (errno.EROFS, "the file system is read-only")])
@pytest.mark.parametrize("command", ["import", "import into a new store", "score", "learn", "generate", "round"])
def test_a_lock_file_on_a_full_or_read_only_file_system(store, model_dir, tmp_path, monkeypatch, code, hint,
                                                        command):
    imported_store(store, tmp_path)
    path = write_lines(tmp_path / "more.jsonl", [IMPORT_GOOD | {"problem": "2+2?", "answer": "4"}])
    root = tmp_path / "fresh" if command == "import into a new store" else store.root
    args = {"import": ["import", path], "import into a new store": ["import", path], "score": ["score"],
            "learn": ["learn"], "generate": ["generate", "--model", model_dir, "--engine", "transformers"],
            "round": ["round"]}[command]
    lock = root / (".round.lock" if command == "round" else ".locks")
    before = snapshot(store.root)
    lock_open_fails(code, monkeypatch)
    line = fails_cleanly(invoke(*args, "--store", root), f"cannot write {lock}", os.strerror(code), hint,
                         "the store's files are whole")
    assert ".lock" in line
    monkeypatch.undo()
    assert snapshot(store.root) == before
    assert not (tmp_path / "fresh").exists()


def test_the_lock_holders_name_on_a_full_disk_names_the_store(store, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])
    monkeypatch.setattr(os, "pwrite", lambda *a: no_space())  # pwrite's OSError names no file
    fails_cleanly(invoke("import", path, "--store", store.root), f"cannot write store {store.root}",
                  "No space left on device", "the file system is full")
    assert part_and_temp_files(store.root) == []


def test_a_new_store_on_a_read_only_file_system(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.mkdir

    def read_only(target, *args, **kwargs):
        if str(target).startswith(str(parent)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    fails_cleanly(invoke("import", path, "--store", parent / "store"), f"cannot write {parent / 'store'}",
                  "Read-only file system")
    monkeypatch.undo()
    assert list(parent.iterdir()) == []


def test_a_part_write_on_a_read_only_file_system(store, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])

    def read_only(table, where, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(where))

    monkeypatch.setattr(pq, "write_table", read_only)
    line = fails_cleanly(invoke("import", path, "--store", store.root), "cannot write", "Read-only file system")
    assert f"{store.root}/prompts/part-" in line  # the first part an import writes
    assert part_and_temp_files(store.root) == []


def test_a_manifest_write_on_a_read_only_file_system(store, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "done.jsonl", [IMPORT_GOOD])
    real = os.replace

    def read_only(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    fails_cleanly(invoke("import", path, "--store", store.root),
                  f"cannot write {store.manifest_path(0, 'import')}", "Read-only file system")
    monkeypatch.undo()
    assert [p for p in store.root.rglob(".tmp-*")] == []  # the rows are whole parts; no temp file is left
    assert store.read_manifest(0, "import") is None


@pytest.mark.parametrize("flags, detail", [
    (["--batch-size", 0], "--batch-size must be at least 1, got 0"),
    (["--batch-size", -2], "--batch-size must be at least 1, got -2"),
    (["--engine", "foo"], "unknown --engine 'foo'; choose from auto, transformers, vllm"),
])
def test_bad_generate_flags_write_nothing(model_dir, tmp_path, flags, detail):
    args = ["generate", "--store", tmp_path / "fresh", "--model", model_dir, "-G", 2, "--num-prompts", 2, *flags]
    fails_cleanly(invoke(*args), detail)
    assert not (tmp_path / "fresh").exists()


@pytest.fixture()
def learnable(tmp_path, model_dir):
    """A scored round of the tiny model's token ids: what learn selects and trains on."""
    from replay.manifests import finish_manifest, start_manifest
    from tests._store_rows import prompt_row, rollout_row, verdict_row

    store = Store.create(tmp_path / "learnable", base_model=str(model_dir))
    prompts = [prompt_row(f"problem {i}") for i in range(2)]
    store.write("prompts", prompts)
    rows = [rollout_row(0, p["prompt_id"], i) for p in prompts for i in range(2)]
    store.write("rollouts", rows, round=0)
    store.write("verdicts", [verdict_row(0, r["prompt_id"], r["sample_idx"], r["sample_idx"] == 0) for r in rows],
                round=0)
    store.write_manifest(0, "generate", finish_manifest(start_manifest("generate", 0, {"num_samples": 2}), {}))
    return store


@pytest.mark.parametrize("flags, detail", [
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
    (["--lr", -1e-5], "--lr must be a finite number >= 0, got -1e-05"),
    (["--lora-r", 0], "--lora-r must be at least 1, got 0"),
    (["--lora-alpha", 0], "--lora-alpha must be at least 1, got 0"),
    (["--lora-dropout", 1], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number above 0"),
    (["--clip-eps", -0.1], "--clip-eps must be a finite number above 0"),
    (["--lens-alpha", "nan"], "--lens-alpha must be a finite number >= 0"),
    (["--dual-clip", 0.5], "--dual-clip must be a finite number above 1"),
    (["--target-modules", ","], "--target-modules names no module"),
    (["--target-modules", "nosuch"], "--target-modules nosuch: no module of LlamaForCausalLM has that name; "
                                     "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"),
    (["--target-modules", "q_proj,nosuch"], "--target-modules nosuch: no module"),
])
def test_bad_learn_flags(learnable, model_dir, flags, detail):
    before = snapshot(learnable.root)
    fails_cleanly(invoke("learn", "--store", learnable.root, "--model", model_dir, "--device", "cpu", *flags),
                  detail, progress_before=True)
    assert snapshot(learnable.root) == before


@pytest.mark.parametrize("content, detail", [(b"\xff\xfe[learn]\nlr = 1e-5\n", "not UTF-8 text (byte 0)"),
                                             (b"[learn]\nlr = nan\n", "[learn] lr: nan is not a valid float"),
                                             (None, "is a directory; --config takes a TOML file")])
def test_bad_round_config_files(store, tmp_path, content, detail):
    config = tmp_path / "round.toml"
    config.mkdir() if content is None else config.write_bytes(content)
    before = snapshot(store.root)
    fails_cleanly(invoke("round", "--store", store.root, "--config", config), config, detail)
    assert snapshot(store.root) == before


@pytest.mark.parametrize("output", ["file", "-"])
def test_sql_result_parquet_cannot_hold(store, tmp_path, output):
    target = tmp_path / "out.parquet" if output == "file" else "-"
    result = invoke("sql", "select interval 1 day as x", "--store", store.root, "-f", "parquet", "-o", target)
    fails_cleanly(result, "the result cannot be written as Parquet", "month_day_nano_interval", "CAST(x AS VARCHAR)")
    assert list(tmp_path.glob("out.parquet")) == [] and list(tmp_path.glob(".tmp-*")) == []


def test_import_of_an_endless_line_stops_at_the_cap(store, tmp_path, monkeypatch):
    from stages import import_rollouts

    monkeypatch.setattr(import_rollouts, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "one-line.jsonl"
    path.write_bytes(json.dumps(IMPORT_GOOD).encode() + b"\n" + b"\0" * (3 << 20))  # as /dev/zero: no line break
    before = snapshot(store.root)
    fails_cleanly(invoke("import", path, "--store", store.root), f"{path}:line 2",
                  "longer than 1,048,576 bytes without a line break")
    assert snapshot(store.root) == before


def test_import_from_an_endless_stream(store, tmp_path, monkeypatch):
    """/dev/zero without reading it: a FIFO fed zeros by a thread until the reader stops."""
    import threading

    from stages import import_rollouts

    monkeypatch.setattr(import_rollouts, "MAX_LINE_BYTES", 1 << 20)
    fifo = tmp_path / "zero"
    os.mkfifo(fifo)
    fed = []

    def feed():
        with open(fifo, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fed.append(65536)
            except (BrokenPipeError, ValueError):
                return

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    before = snapshot(store.root)
    fails_cleanly(invoke("import", fifo, "--store", store.root), f"{fifo}:line 1", "without a line break")
    writer.join(timeout=10)
    assert not writer.is_alive() and sum(fed) < 8 << 20  # stopped reading at the cap, not at MemoryError
    assert snapshot(store.root) == before
