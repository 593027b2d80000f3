"""Reference solutions (the prompts table's `solution`): every built-in one (arith at every level, the
GSM8K and MATH-500 fixtures) is judged correct against its own gold by the verifier `replay score`
uses; a `solution` column of the input reaches the store; a non-string one is one clear error; and
stores written before the column existed still read (NULL), pass `replay doctor` and feed prompt sets."""

import json
import re
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from replay.datasets import (ARITH_LEVELS, DatasetError, arith_prompts, file_prompts, gsm8k_solution,
                             load_prompts)
from replay.prompt_sets import select_prompt_set
from replay.read.doctor import check_store
from replay.rows import register_prompts
from replay.store import Store
from replay.verify import VerifierPool
from tests._cli import invoke, invoke_ok
from tests._store_rows import prompt_row
from tests._tiny_model import save_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
PER_LEVEL = 50
STEP = re.compile(r"^(-?\d+) ([-+×]) (\d+) = (-?\d+)$")


def _fixture_rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def _arith(level):
    return arith_prompts(PER_LEVEL, seed=0, levels=(level,)) + arith_prompts(10, split="test", seed=0, levels=(level,))


@pytest.fixture(scope="module")
def pool():
    # as `replay score` builds it (stages/score.py): default math-verify timeouts, gold = prompts.answer
    with VerifierPool(workers=1, timeout=10.0) as p:
        yield p


def _verdicts(pool, pairs):
    """{index: Verdict} for (gold, completion) pairs, each key back exactly once."""
    verdicts = list(pool.verify_many((i, gold, text) for i, (gold, text) in enumerate(pairs)))
    assert sorted(v.key for v in verdicts) == list(range(len(pairs)))
    return {v.key: v for v in verdicts}


BUILT_IN = {f"arith-level-{level}": (lambda level=level: _arith(level)) for level in ARITH_LEVELS}
BUILT_IN |= {"gsm8k": lambda: file_prompts(FIXTURES / "gsm8k_sample.jsonl"),
             "math500": lambda: file_prompts(FIXTURES / "math500_sample.jsonl")}


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_every_built_in_reference_solution_verifies_against_its_gold(pool, name):
    prompts = BUILT_IN[name]()
    assert prompts and all(p.solution for p in prompts)
    verdicts = _verdicts(pool, [(p.answer, p.solution) for p in prompts])
    wrong = [(prompts[i].problem[:60], prompts[i].answer, v.status, v.extracted_answer)
             for i, v in verdicts.items() if not (v.correct and v.status == "ok")]
    assert wrong == []
    if name != "math500":  # a control: the same solutions are not right for a neighbouring gold
        off = _verdicts(pool, [(str(Fraction(p.answer) + 1), p.solution) for p in prompts])
        assert not any(v.correct for v in off.values())


@pytest.mark.parametrize("level", list(ARITH_LEVELS))
def test_arith_solution_is_one_exact_line_per_operation_then_the_boxed_gold(level):
    prompts = _arith(level)
    n_operands, _, ops = ARITH_LEVELS[level]
    for p in prompts:
        *steps, last = p.solution.split("\n")
        assert last == f"\\boxed{{{p.answer}}}", p.solution
        assert len(steps) == n_operands - 1, p.solution  # one line per operator of the problem
        for line in steps:
            a, op, b, result = STEP.match(line).groups()
            a, b, result = int(a), int(b), int(result)
            assert result == {"+": a + b, "-": a - b, "×": a * b}[op], line
        # products before sums: every × line comes first, and the last line computes the answer
        kinds = ["×" if "×" in line else "±" for line in steps]
        assert kinds == sorted(kinds, key=lambda k: k != "×"), p.solution
        assert int(STEP.match(steps[-1]).group(4)) == int(p.answer)
    if "*" in ops:  # the sample exercises precedence: a product that is then added to or taken from
        assert any(re.search(r"×[^\n]*\n-?\d+ [-+] ", p.solution) for p in prompts)


@pytest.mark.parametrize("numbers, operators, expected", [
    ([3, 4, 5, 2], "+*-", ["4 × 5 = 20", "3 + 20 = 23", "23 - 2 = 21", "\\boxed{21}"]),
    ([2, 3, 4, 50], "**-", ["2 × 3 = 6", "6 × 4 = 24", "24 - 50 = -26", "\\boxed{-26}"]),
    ([10, 2, 3, 4], "-*+", ["2 × 3 = 6", "10 - 6 = 4", "4 + 4 = 8", "\\boxed{8}"]),
    ([7, 8], "-", ["7 - 8 = -1", "\\boxed{-1}"]),
])
def test_arith_solution_format(monkeypatch, numbers, operators, expected):
    from replay import datasets

    monkeypatch.setattr(datasets, "_arith_terms", lambda *draw: (numbers, list(operators)))
    assert datasets.arith_solution(0, "train", 0, 5).split("\n") == expected
    problem, answer = datasets.arith_problem(0, "train", 0, 5)  # the same draw gives the problem and its gold
    assert expected[-1] == f"\\boxed{{{answer}}}" and problem.count("×") == operators.count("*")


def test_arith_solutions_are_deterministic():
    assert [p.solution for p in _arith(5)] == [p.solution for p in _arith(5)]


def test_gsm8k_solution_is_the_worked_text_without_calculator_notes():
    rows = _fixture_rows("gsm8k_sample.jsonl")
    prompts = file_prompts(FIXTURES / "gsm8k_sample.jsonl")
    assert prompts[0].solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                                   "Natalia sold 48+24 = 72 clips altogether in April and May.\n\\boxed{72}")
    for row, p in zip(rows, prompts, strict=True):
        assert "<<" not in p.solution and ">>" not in p.solution and "####" not in p.solution
        assert p.solution.endswith(f"\n\\boxed{{{p.answer}}}")
        assert "," not in p.solution.rsplit("\n", 1)[1]  # "#### 1,080" boxes 1080, the gold
    assert gsm8k_solution("#### 5") == "\\boxed{5}"


def test_a_solution_field_is_taken_as_is_and_wins_over_the_gsm8k_derivation(tmp_path):
    rows = _fixture_rows("math500_sample.jsonl")
    assert [p.solution for p in file_prompts(FIXTURES / "math500_sample.jsonl")] == [r["solution"] for r in rows]
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2", "solution": "mine"}) + "\n"
                    + json.dumps({"question": "R?", "answer": "#### 3", "solution": None}) + "\n")
    assert [p.solution for p in file_prompts(path)] == ["mine", "\\boxed{3}"]


def _sql_json(root, query):
    return json.loads(invoke_ok("sql", query, "--store", root, "--format", "json"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _generate(root, model_dir, dataset):
    return invoke("generate", "--store", root, "--model", model_dir, "--engine", "transformers", "-G", 1,
                  "--max-new-tokens", 2, "--dataset", dataset)


def test_a_solution_column_is_imported_and_absent_ones_are_null(tmp_path, model_dir):
    root = tmp_path / "store"
    with_column = tmp_path / "with.jsonl"
    with_column.write_text(json.dumps({"problem": "w1 w2", "answer": "3", "solution": "1 + 2 = 3\n\\boxed{3}"})
                           + "\n" + json.dumps({"problem": "w3 w4", "answer": "4"}) + "\n")
    without = tmp_path / "without.jsonl"
    without.write_text(json.dumps({"problem": "w5 w6", "answer": "5"}) + "\n")
    for dataset in (with_column, without):
        result = _generate(root, model_dir, dataset)
        assert result.exit_code == 0, result.output
    assert _sql_json(root, "select problem, solution from prompts order by problem") == [
        {"problem": "w1 w2", "solution": "1 + 2 = 3\n\\boxed{3}"}, {"problem": "w3 w4", "solution": None},
        {"problem": "w5 w6", "solution": None}]
    # a prompt set chosen by SQL carries the solution with the prompt
    chosen = select_prompt_set(Store.open(root), "select prompt_id from prompts where problem = 'w1 w2'")
    assert [p.solution for p in chosen.prompts] == ["1 + 2 = 3\n\\boxed{3}"]


def test_parquet_input_and_the_arith_task_store_their_solutions(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": ["1", "2"], "solution": ["\\boxed{1}", None]}), path)
    store = Store.create(tmp_path / "store")
    register_prompts(store, load_prompts(str(path)) + load_prompts("arith", num_prompts=3, levels=(4,)))
    got = _sql_json(store.root, "select source, answer, solution from prompts order by source, problem")
    assert [r["source"] for r in got] == ["arith-0"] * 3 + ["p"] * 2
    assert all(r["solution"].endswith(f"\n\\boxed{{{r['answer']}}}") for r in got[:3])
    assert [r["solution"] for r in got[3:]] == ["\\boxed{1}", None]


@pytest.mark.parametrize("value, kind", [(5, "int"), (["x"], "list"), ({"a": 1}, "dict"), (True, "bool")])
def test_a_non_string_solution_is_one_clear_error(tmp_path, value, kind):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "p1", "answer": "1"}) + "\n"
                    + json.dumps({"problem": "p2", "answer": "2", "solution": value}) + "\n")
    with pytest.raises(DatasetError) as caught:
        file_prompts(path)
    assert str(caught.value) == f"{path}:line 2: field 'solution' must be text, got {kind}"


def test_a_non_string_solution_fails_generate_cleanly_before_any_write(tmp_path, model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "w1", "answer": "1", "solution": 7}) + "\n")
    result = _generate(tmp_path / "store", model_dir, path)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {path}:line 1: field 'solution' must be text, got int"], result.output
    assert not list((tmp_path / "store").glob("prompts/part-*.parquet"))


def _old_prompts_file(root, rows, name):
    """A prompts file as written before `solution` existed (the schema without it)."""
    old = pa.schema([f for f in schemas.arrow_schema("prompts") if f.name != "solution"])
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=old), root / "prompts" / f"part-{name}.parquet")


def test_a_store_written_before_the_column_reads_null(tmp_path):
    store = Store.create(tmp_path / "store")
    _old_prompts_file(store.root, [prompt_row("1+1?", "2")], "old")
    # only old files: the column still exists, NULL
    assert _sql_json(store.root, "select problem, solution from prompts") == [{"problem": "1+1?", "solution": None}]
    assert select_prompt_set(Store.open(store.root), "select prompt_id from prompts").prompts[0].solution is None
    # old and new files side by side, and rows that leave the column out (as older code wrote them)
    store.write("prompts", [dict(prompt_row("2+2?", "4"), solution="\\boxed{4}"), prompt_row("3+3?", "6")])
    assert _sql_json(store.root, "select problem, solution from prompts order by problem") == [
        {"problem": "1+1?", "solution": None}, {"problem": "2+2?", "solution": "\\boxed{4}"},
        {"problem": "3+3?", "solution": None}]
    assert _sql_json(store.root, "select count(*) as n from samples") == [{"n": 0}]  # the views still bind
    assert check_store(store.root) == []  # doctor: a missing grown column is not a schema mismatch
