"""Silent corruption (issue 24 §4): bytes flipped inside a data page, and values out of range in a
file that is itself sound. DuckDB reads both as numbers; page checksums and `doctor --deep` name
the file, and `learn` refuses such rows in one line instead of crashing on them."""

import json
import math
import random

import duckdb
import pyarrow.parquet as pq
import pytest

import schemas
from replay import summary
from replay.manifests import finish_manifest, start_manifest
from replay.read.doctor import check_store, diagnose
from replay.store import Store, validate
from tests._cli import invoke
from tests._store_rows import prompt_row, rollout_row, verdict_row

G, TOKENS = 4, 400


def build(root, base_model="test-model", tokens=TOKENS, seed=0):
    """Four prompts x G samples, scored, in one rollouts part whose logprobs (random floats, which
    ZSTD stores nearly raw) are most of the file."""
    rng = random.Random(seed)
    store = Store.create(root, base_model=base_model)
    prompts = [prompt_row(f"problem {i}", "1") for i in range(4)]
    store.write("prompts", prompts)
    rows = [rollout_row(0, p["prompt_id"], i, logprobs=[-rng.uniform(0.01, 5) for _ in range(tokens)])
            for p in prompts for i in range(G)]
    part = store.write("rollouts", rows, round=0)
    store.write("verdicts", [verdict_row(0, r["prompt_id"], r["sample_idx"], r["sample_idx"] == 0) for r in rows],
                round=0)
    store.write_manifest(0, "generate", finish_manifest(start_manifest("generate", 0, {"num_samples": G}),
                                                        {"prompts": 4}))
    summary.refresh(store, 0)
    return store, part, rows


def flip_a_third_of_the_way(part, n=64):
    """XOR n bytes with 0xFF a third of the way into the file; returns the offset."""
    data = bytearray(part.read_bytes())
    offset = len(data) // 3
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    part.write_bytes(bytes(data))
    return offset


def column_at(part, offset):
    """The column chunk holding byte `offset`, and how far inside its payload (past 100 header bytes)."""
    meta = pq.ParquetFile(part).metadata.row_group(0)
    for i in range(meta.num_columns):
        col = meta.column(i)
        start = col.dictionary_page_offset or col.data_page_offset
        if start + 100 <= offset and offset + 64 <= start + col.total_compressed_size:
            return col.path_in_schema
    return None


def errors(root, deep):
    return [p for p in check_store(root, deep=deep) if p.severity == "error"]


# -- page checksums ---------------------------------------------------------------------------------
def test_parts_are_written_with_page_checksums(tmp_path):
    _, part, _ = build(tmp_path / "store")
    pq.read_table(part, page_checksum_verification=True)  # verifies, and passes
    data = bytearray(part.read_bytes())
    offset = len(data) // 3
    data[offset] ^= 0x01  # one bit
    part.write_bytes(bytes(data))
    with pytest.raises(OSError, match="CRC"):
        pq.read_table(part, page_checksum_verification=True)


def test_the_issues_flip_is_named_by_doctor_deep_only(tmp_path):
    store, part, _ = build(tmp_path / "store")
    assert errors(store.root, deep=True) == []
    offset = flip_a_third_of_the_way(part)
    assert column_at(part, offset) == "completion_logprobs.list.element"  # inside the page, not its header

    # what the issue saw: DuckDB reads the page without a check, every read command runs on it
    with duckdb.connect() as con:
        lo, hi = con.execute(f"SELECT min(list_min(completion_logprobs)), max(list_max(completion_logprobs)) "
                             f"FROM read_parquet('{part}')").fetchall()[0]
    assert not (-5.01 <= lo and hi <= 0)  # values no sampler made: huge, positive or NaN
    assert invoke("sql", "select count(*) from rollouts", "--store", store.root).exit_code == 0

    # shallow doctor reads footers only: it passes, and says what it did not look at
    shallow = invoke("doctor", "--store", store.root)
    assert shallow.exit_code == 0 and "footers only: --deep reads every page" in shallow.output, shallow.output

    deep = invoke("doctor", "--store", store.root, "--deep")
    assert deep.exit_code == 1
    lines = deep.output.splitlines()
    named = [line for line in lines if str(part) in line]
    assert len(named) == 1 and "page checksum mismatch" in named[0], deep.output
    assert lines[-1].startswith("error: ") and "error(s) in the store" in lines[-1]
    assert "Traceback" not in deep.output


def test_a_flipped_token_id_page_is_named_too(tmp_path):
    store, part, _ = build(tmp_path / "store")
    meta = pq.ParquetFile(part).metadata.row_group(0)
    ids = next(meta.column(i) for i in range(meta.num_columns)
               if meta.column(i).path_in_schema.startswith("completion_token_ids"))
    data = bytearray(part.read_bytes())
    middle = ids.data_page_offset + ids.total_compressed_size // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    part.write_bytes(bytes(data))
    (problem,) = [p for p in errors(store.root, deep=True) if p.path == part]
    assert "corrupt data pages" in problem.message


# -- values out of range in a sound file ------------------------------------------------------------
def write_part(store, rows, name="part-planted.parquet"):
    """Rows straight to a part file (checksummed, schema-valid): no writer's check sees them."""
    table = validate("rollouts", rows).drop_columns(["round"])
    path = store.table_dir("rollouts", 0) / name
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)
    pq.read_table(path, page_checksum_verification=True)  # the file itself is sound
    return path


def replace_logprobs(row, values):
    return row | {"completion_logprobs": values, "sum_logprob": math.fsum(values)}


CASES = {
    "positive": (lambda r: replace_logprobs(r, [-0.5, 5e14]), "logprob-le-0"),
    "nan": (lambda r: replace_logprobs(r, [-0.5, float("nan")]), "logprob-finite"),
    "minus inf": (lambda r: r | {"completion_logprobs": [-0.5, float("-inf")], "sum_logprob": -1.0},
                  "logprob-finite"),
    "issue's -7e36": (lambda r: replace_logprobs(r, [-0.5, -7e36]), "logprob-floor"),
    "negative token id": (lambda r: r | {"completion_token_ids": [0, -3]}, "token-id-negative"),
    "negative prompt id": (lambda r: r | {"prompt_token_ids": [1, -1, 3]}, "token-id-negative"),
    "fewer logprobs": (lambda r: replace_logprobs(r, [-0.5]), "lengths"),
    "wrong count": (lambda r: r | {"num_completion_tokens": 7}, "lengths"),
    "wrong sum": (lambda r: r | {"sum_logprob": -3.0}, "sum-logprob"),
}


@pytest.mark.parametrize("case", CASES)
def test_out_of_range_values_name_row_and_check(tmp_path, case):
    change, check = CASES[case]
    store, part, rows = build(tmp_path / "store", tokens=2)
    part.unlink()  # the same rows again, one of them changed
    victim = rows[5]
    path = write_part(store, [change(r) if r is victim else r for r in rows])
    assert errors(store.root, deep=False) == []  # footers and keys are fine
    problems = [p for p in check_store(store.root, deep=True) if p.path == path]
    assert len(problems) == 1, problems
    (problem,) = problems
    assert f"value check {check!r}" in problem.message
    assert f"(round 0, prompt_id {victim['prompt_id']}, sample_idx {victim['sample_idx']})" in problem.message
    assert problem.severity == ("warning" if check == "logprob-floor" else "error")
    assert "\n" not in str(problem)


def test_token_ids_against_the_store_models_vocabulary(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 100}))
    store, part, rows = build(tmp_path / "store", base_model=str(model), tokens=2)
    assert errors(store.root, deep=True) == []
    assert "token ids checked >= 0 only" not in diagnose(store.root, deep=True).summary()
    part.unlink()
    path = write_part(store, [r | {"completion_token_ids": [0, 100]} if r is rows[2] else r for r in rows])
    (problem,) = errors(store.root, deep=True)
    assert problem.path == path and "'token-id-vocab'" in problem.message and "(100 tokens)" in problem.message
    assert f"sample_idx {rows[2]['sample_idx']})" in problem.message


def test_an_unknown_model_checks_token_ids_for_sign_only_and_says_so(tmp_path):
    store, _, _ = build(tmp_path / "store", tokens=2)  # base model "test-model": nothing on disk
    result = diagnose(store.root, deep=True)
    assert result.errors == []
    assert "token ids checked >= 0 only: the vocabulary of 'test-model' is not at hand" in result.summary()


# -- learn refuses what DuckDB hands it -------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests._tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("change, detail", [
    (lambda r: replace_logprobs(r, [-0.5, 5e14]), "stored completion_logprobs holds 5e+14"),  # OverflowError before
    (lambda r: replace_logprobs(r, [-0.5, float("nan")]), "stored completion_logprobs holds nan"),
    (lambda r: r | {"completion_token_ids": [0, 51]}, "completion_token_ids holds 51, outside the model's "
                                                      "vocabulary of 51"),
])
def test_learn_refuses_corrupt_rows_in_one_line(tmp_path, model_dir, change, detail):
    store, part, rows = build(tmp_path / "store", base_model=str(model_dir), tokens=2)
    part.unlink()
    victim = rows[3]
    write_part(store, [change(r) if r is victim else r for r in rows])
    files = lambda: sorted(p.name for p in store.root.rglob("*") if p.is_file() and ".locks" not in p.parts)  # noqa: E731
    before = files()
    result = invoke("learn", "--store", store.root, "--model", model_dir, "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: round 0 prompt {victim['prompt_id']} sample {victim['sample_idx']}: {detail}")
    assert f"replay doctor --store {store.root} --deep" in line
    assert files() == before  # no adapter, no manifest


def test_schema_of_planted_parts_matches_the_store():
    # write_part's files must be exactly what the store writes (else doctor reports a schema mismatch)
    fields = [f.name for f in schemas.arrow_schema("rollouts") if f.name != "round"]
    table = validate("rollouts", [rollout_row(0, "p", 0)]).drop_columns(["round"])
    assert table.column_names == fields


def test_learn_verifies_the_page_checksums_of_its_rounds(tmp_path, model_dir):
    store, part, _ = build(tmp_path / "store", base_model=str(model_dir), tokens=50)
    meta = pq.ParquetFile(part).metadata.row_group(0)
    lps = next(meta.column(i) for i in range(meta.num_columns)
               if meta.column(i).path_in_schema.startswith("completion_logprobs"))
    data = bytearray(part.read_bytes())
    middle = lps.data_page_offset + lps.total_compressed_size // 2
    data[middle:middle + 4] = bytes(b ^ 0x01 for b in data[middle:middle + 4])  # small: values stay plausible
    part.write_bytes(bytes(data))
    result = invoke("learn", "--store", store.root, "--model", model_dir, "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {part}: corrupt data pages: page checksum mismatch"), line
    assert "learn stopped before training on it" in line and not (store.root / "adapters").exists()
