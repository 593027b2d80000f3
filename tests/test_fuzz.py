"""Property tests on hostile input: readers answer with rows or their own error, never another
exception; text helpers never raise; the SQL guard leaves the store byte-identical; the pure core
stays finite. Bounded so the whole file runs in seconds.

Included on purpose (each once escaped the readers, see test_bad_input.py): lone surrogates in text,
integers outside int32 in `level` / `sample_idx`, non-integer `sample_idx`, NaN and infinite
logprobs, JSON nested deeper than Python's recursion limit and integers longer than it converts.
"""

import hashlib
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay import answers
from replay.core.advantages import OBJECTIVES, compute_advantages, sequence_confidence
from replay.core.loss import policy_loss
from replay.datasets import DatasetError, file_prompts
from replay.errors import ReplayError
from replay.store import Store, utc_now, validate
from stages.import_rollouts import ImportConfig, imported_row, parse_rows
from tests._store_rows import prompt_row, rollout_row as store_rollout_row, verdict_row

READERS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT32 = st.integers(-(2**31), 2**31 - 1)
INTEGERS = st.one_of(INT32, st.integers())  # unbounded: past int32 and int64 too
NASTY = ["", " ", "\x00", "\r", "\u2028", "\\", '"', "é", "🙂", "NaN", "1e999", "#### 3", "\\boxed{", "null",
         "\ud800", "\udfff"]
TEXT = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),  # Cs: lone surrogates
                 st.text(st.characters(blacklist_categories=()), max_size=30),  # ... here included
                 st.lists(st.sampled_from(NASTY), min_size=1, max_size=3).map("".join))
FIELD_VALUES = st.one_of(st.none(), st.booleans(), INTEGERS, st.floats(), TEXT,  # floats: NaN and inf too
                         st.lists(INTEGERS, max_size=3), st.dictionaries(TEXT, INTEGERS, max_size=2))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# -- dataset readers ------------------------------------------------------------------------------
def perturbed(valid: st.SearchStrategy, fields: dict) -> st.SearchStrategy:
    """A valid row with up to two fields replaced or added by hostile values: reaches deep checks."""
    changes = st.lists(st.sampled_from(sorted(fields)).flatmap(lambda k: st.tuples(st.just(k), fields[k])),
                       max_size=2)
    return st.builds(lambda row, change: row | dict(change), valid, changes)


SOME_TEXT = TEXT.filter(str.strip)
json_rows = perturbed(
    st.fixed_dictionaries({"problem": SOME_TEXT, "answer": SOME_TEXT}),
    {"problem": FIELD_VALUES, "question": FIELD_VALUES, "answer": FIELD_VALUES, "unique_id": FIELD_VALUES,
     "subject": FIELD_VALUES, "level": st.one_of(FIELD_VALUES, st.integers(-5, 10**6), st.just("Level 3"),
                                                  st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**40]),
                                                  st.integers(2**31).map(lambda n: f"Level {n}"))})
hostile_lines = st.one_of(
    st.binary(max_size=40),
    st.recursive(st.none() | st.booleans() | INTEGERS | TEXT, lambda inner: st.lists(inner, max_size=3),
                 max_leaves=8).map(lambda value: json.dumps(value).encode()),
    st.sampled_from([b"", b"   ", b"{", b"\xff\xfe", b'{"problem": "a"', b"\x00", b"NaN", b'{"problem": "\xe9"}',
                     b'{"problem": "\\ud800", "answer": "1"}', b'{"problem": "a", "answer": "\\udc00x"}',
                     b"[" * 100_000, b'{"a": ' * 50_000, b'{"problem": "a", "answer": ' + b"9" * 5000 + b"}"]),
)
jsonl_lines = st.builds(lambda rows, hostile, at: rows[:at] + [hostile] + rows[at:] if hostile is not None else rows,
                        st.lists(json_rows.map(lambda row: json.dumps(row).encode()), max_size=5),
                        st.one_of(st.none(), hostile_lines), st.integers(0, 5))


@READERS
@given(lines=jsonl_lines, newline=st.sampled_from([b"\n", b"\r\n"]))
def test_jsonl_reader_returns_storable_prompts_or_a_dataset_error(workdir, lines, newline):
    path = workdir / "fuzz.jsonl"
    path.write_bytes(newline.join(lines))
    try:
        prompts = file_prompts(path)
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    assert prompts and all(p.problem.strip() and p.answer.strip() for p in prompts)
    validate("prompts", [dict(vars(p), created_at=utc_now()) for p in prompts])


parquet_columns = st.sampled_from([
    pa.array(["What?"]), pa.array([7]), pa.array([1.5]), pa.array([True]), pa.array([None], pa.string()),
    pa.array([[1, 2]]), pa.array([{"a": 1}]), pa.array([""]), pa.array([b"\xff"], pa.binary()),
    pa.array([2**40]), pa.array([-(2**31) - 1]), pa.array([float("nan")]), pa.array([float("inf")]),
    pa.array(["Level 3"]),
])


@settings(max_examples=60, deadline=None)
@given(columns=st.dictionaries(st.sampled_from(["problem", "answer", "level", "unique_id", "question"]),
                               parquet_columns, max_size=4))
def test_parquet_reader_returns_storable_prompts_or_a_dataset_error(workdir, columns):
    path = workdir / "fuzz.parquet"
    pq.write_table(pa.table(columns) if columns else pa.table({"x": [1]}), path)
    try:
        prompts = file_prompts(path)
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    validate("prompts", [dict(vars(p), created_at=utc_now()) for p in prompts])


# -- `replay import` row parser ---------------------------------------------------------------------
aligned_tokens = st.integers(0, 4).flatmap(lambda n: st.fixed_dictionaries({
    "completion_token_ids": st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n),
    "completion_logprobs": st.lists(st.floats(-1e4, 0.0), min_size=n, max_size=n)}))
import_rows = perturbed(
    st.builds(lambda row, tokens: row | tokens,
              st.builds(lambda pair, text: {"problem": pair[0], "answer": pair[1], "completion": text},
                        st.sampled_from([("1+1?", "2"), ("2+2?", "4")]), TEXT),
              st.one_of(st.just({}), aligned_tokens)),
    {"problem": st.one_of(FIELD_VALUES, st.just("")), "answer": FIELD_VALUES, "completion": FIELD_VALUES,
     "prompt_id": st.one_of(TEXT, INTEGERS),
     "sample_idx": st.one_of(st.none(), st.integers(0, 2**31 - 1), st.sampled_from([-1, 2**31, 2**40, 1.0, "0"]),
                             FIELD_VALUES),
     "completion_token_ids": st.one_of(FIELD_VALUES, st.lists(st.one_of(st.integers(0, 2**31 - 1), st.booleans(),
                                                                        st.floats(0, 10), INTEGERS), max_size=4)),
     "completion_logprobs": st.one_of(FIELD_VALUES, st.lists(st.one_of(st.floats(max_value=1.0),  # NaN, -inf
                                                                       st.just(-1e39)), max_size=4))})


@READERS
@given(rows=st.lists(import_rows, max_size=6))
def test_import_parser_returns_storable_rollouts_or_a_dataset_error(workdir, rows):
    path = workdir / "import.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    try:
        prompts, parsed = parse_rows(path, ImportConfig(file=str(path)))
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    now = utc_now()
    stored = validate("rollouts", [imported_row(ImportConfig(), r, now) for r in parsed])
    validate("prompts", [dict(vars(p), created_at=now) for p in prompts])
    keys = list(zip(stored.column("prompt_id").to_pylist(), stored.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys)) == len(rows)
    for logprobs in stored.column("completion_logprobs").to_pylist():
        assert logprobs is None or all(lp <= 0 for lp in logprobs)


# -- answer text helpers ------------------------------------------------------------------------------
ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=60)  # surrogates and controls included
ANSWERISH = st.lists(st.sampled_from(["\\boxed{", "}", "####", " ", "\n", "3", "14/3", ".", "$", "x = ", "\x00",
                                      "\ud800", "é", "{", "\\frac{1}{2}"]), max_size=20).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(ANY_TEXT, ANSWERISH), filler=st.integers(0, 5000))
def test_answer_helpers_never_raise_and_keep_their_promises(text, filler):
    cleaned = answers.clean_text(text)
    cleaned.encode("utf-8")  # strict: no lone surrogate survives
    assert answers.clean_text(cleaned) == cleaned
    assert not any(ord(c) < 0x20 and c not in "\t\n\r" or 0x7F <= ord(c) < 0xA0 for c in cleaned)
    long = "a" * filler + text + "b" * (filler // 2)
    window = answers.answer_window(long)
    assert len(window) <= answers.ANSWER_WINDOW_CHARS and window in long
    if "\\boxed" in long:
        assert "\\boxed" in window  # the last box is always kept
    promoted = answers.promote_hash_answer(text)
    assert answers.promote_hash_answer(promoted) == promoted
    assert len(answers.drop_full_stops_after_numbers(text)) == len(text)
    answers.prepare_completion(long).encode("utf-8")
    assert "\\boxed" in answers.gold_latex(text)
    assert len(answers.clip(text, 5)) <= 5
    if "####" in text and text.rpartition("####")[2].strip().replace(",", ""):
        assert isinstance(answers.split_gsm8k_answer(text), tuple)
        assert "\\boxed{" in answers.boxed_gsm8k_completion(text)
    else:
        with pytest.raises(ValueError):
            answers.split_gsm8k_answer(text)


@pytest.fixture(scope="module")
def judge():
    from replay.verify import STATUSES
    from replay.verify_worker import Judge

    return Judge(parse_timeout=1, verify_timeout=1), STATUSES


@settings(max_examples=25, deadline=None)
@given(gold=st.one_of(ANSWERISH, TEXT), completion=st.one_of(ANSWERISH, ANY_TEXT))
def test_judge_in_process_always_answers_with_a_status(judge, gold, completion):
    run, statuses = judge
    correct, status, extracted, error = run(gold, completion)
    assert isinstance(correct, bool) and status in statuses
    assert isinstance(extracted, str) and len(extracted) <= answers.EXTRACTED_MAX_CHARS
    assert error is None or len(error) <= answers.ERROR_MAX_CHARS


# -- the SQL guard ----------------------------------------------------------------------------------
VIEWS = ["rollouts", "verdicts", "samples", "groups", "prompts", "rounds", "negative_groups", "learn_audit"]
WRITES = [
    "INSERT INTO {view} SELECT * FROM {view}", "UPDATE {view} SET round = 9", "DELETE FROM {view}",
    "CREATE TABLE t AS SELECT 1", "CREATE OR REPLACE VIEW {view} AS SELECT 1", "CREATE MACRO m(x) AS x",
    "DROP VIEW {view}", "ALTER VIEW {view} RENAME TO z", "COPY {view} TO '{target}' (FORMAT parquet)",
    "COPY (SELECT 1 AS a) TO '{target}'", "ATTACH '{target}' AS a", "DETACH a", "USE a",
    "SET threads = 1", "SET enable_external_access = true", "RESET allowed_directories",
    "SET lock_configuration = false", "PRAGMA enable_profiling", "PRAGMA threads = 1", "INSTALL httpfs",
    "LOAD httpfs", "EXPORT DATABASE '{target}'", "IMPORT DATABASE '{target}'", "CALL pragma_version()",
    "CHECKPOINT", "VACUUM", "BEGIN TRANSACTION", "COMMIT", "EXPLAIN ANALYZE COPY {view} TO '{target}'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "EXPLAIN ANALYZE INSERT INTO {view} SELECT * FROM {view}",
]
SELECTS = [
    "SELECT * FROM {view} LIMIT {n}", "SELECT count(*) FROM {view} WHERE round = {n}", "SELECT {n}",
    "WITH x AS (SELECT * FROM {view}) SELECT * FROM x", "EXPLAIN SELECT * FROM {view}",
    "EXPLAIN ANALYZE SELECT * FROM {view}", "SELECT * FROM read_parquet('{store}/rollouts/*/*.parquet')",
    "SELECT * FROM read_text('{target}')", "SELECT * FROM read_csv('{target}')", "SELECT * FROM glob('{target}')",
    "SELECT * FROM query('COPY {view} TO ''{target}''')", "SELECT * FROM query_table('{view}')",
    "SELECT current_setting('threads')", "SELECT * FROM duckdb_settings() LIMIT {n}",
    "SELECT * FROM (SELECT * FROM {view}) USING SAMPLE {n}", "FROM {view} SELECT prompt_id",
]
TARGETS = ["{store}/rollouts/round=0/part-evil.parquet", "{store}/store.json", "{store}/evil.duckdb",
           "{outside}/evil.parquet", "{store}/../outside/x.csv", "{outside}"]


@pytest.fixture(scope="module")
def sql_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("sqlfuzz")
    store = Store.create(base / "store")
    p = prompt_row("2+2?", "4")
    store.write("prompts", [p])
    store.write("rollouts", [store_rollout_row(0, p["prompt_id"], i) for i in range(2)], round=0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], i, i == 0) for i in range(2)], round=0)
    (base / "outside").mkdir()
    return store, base / "outside"


def tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


statement = st.builds(lambda template, view, target, n: template.format(view=view, target=target, n=n,
                                                                         store="{store}", outside="{outside}"),
                      st.sampled_from(WRITES + SELECTS), st.sampled_from(VIEWS), st.sampled_from(TARGETS),
                      st.integers(0, 3))
scripts = st.builds(lambda parts, sep, lead: lead + sep.join(parts), st.lists(statement, min_size=1, max_size=3),
                    st.sampled_from([";", "; ", ";\n", " ; -- note\n"]), st.sampled_from(["", "/* c */ ", "\n"]))


@settings(max_examples=30, deadline=None)
@given(script=scripts)
def test_sql_guard_keeps_the_store_byte_identical(sql_store, script):
    store, outside = sql_store
    before = tree(store.root)
    sql = script.replace("{store}", str(store.root)).replace("{outside}", str(outside))
    try:
        result = store.read_only_query(sql)
    except ReplayError:
        pass
    else:
        assert isinstance(result, pa.Table)
    assert tree(store.root) == before
    assert list(outside.iterdir()) == []


# -- pure core: advantages into the loss ----------------------------------------------------------------
samples = st.tuples(st.booleans(), st.floats(-10, 10), st.integers(0, 5),
                    st.sampled_from([-1e4, -30.0, -1.0, -1e-6, 0.0]), st.floats(-1e4, 0.0))
batches = st.lists(st.lists(samples, min_size=1, max_size=5), min_size=1, max_size=4)  # groups of 1-5


@settings(max_examples=50, deadline=None)
@given(groups=batches, objective=st.sampled_from(OBJECTIVES), binary=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), dual_clip=st.sampled_from([None, 3.0]),
       tis_cap=st.sampled_from([None, 2.0]), clip_eps_high=st.sampled_from([None, 0.28]),
       aggregation=st.sampled_from(["seq-mean-token-mean", "token-mean"]),
       d_imp=st.sampled_from(["confidence", "off", "sequence"]), group_ids=st.sampled_from([1, -7, 2**40]))
def test_advantages_into_the_loss_stay_finite(groups, objective, binary, dtype, dual_clip, tis_cap, clip_eps_high,
                                              aggregation, d_imp, group_ids):
    flat = [(gi, *s) for gi, group in enumerate(groups) for s in group]
    lengths = torch.tensor([s[3] for s in flat])
    old = torch.zeros(len(flat), max(1, int(lengths.max())), dtype=dtype)
    for i, (_, _, _, length, old_lp, _) in enumerate(flat):
        old[i, :length] = old_lp  # logprobs of -1e4 and zero-length completions included
    mask = (torch.arange(old.shape[1])[None, :] < lengths[:, None]).to(dtype)
    sums = (old * mask).sum(1)
    rewards = torch.tensor([float(ok) if binary else reward for _, ok, reward, *_ in flat], dtype=dtype)
    ids = torch.tensor([gi * group_ids for gi, *_ in flat])
    options = {"d_imp_mode": d_imp, "sequence_prob": torch.exp(sums.double())} if objective == "lens" else {}
    result, metrics = compute_advantages(objective, rewards, ids, sequence_confidence(sums, lengths), **options)
    for name in ("advantage", "shaped_reward", "weight"):
        assert torch.isfinite(getattr(result, name)).all(), name
    assert all(math.isfinite(v) for v in metrics.values())
    new = (old + torch.tensor([s[5] for s in flat], dtype=dtype)[:, None] * mask).requires_grad_(True)
    loss, loss_metrics = policy_loss(new, old, result.advantage, mask, weights=result.weight, dual_clip=dual_clip,
                                     tis_cap=tis_cap, clip_eps_high=clip_eps_high, aggregation=aggregation)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(new.grad).all()
    assert all(math.isfinite(v) for v in loss_metrics.values())
