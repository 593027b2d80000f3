import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay.datasets import ARITH_LEVELS, DatasetError, arith_problem, arith_prompts, file_prompts, load_prompts


def test_arith_is_seeded_exact_and_levelled():
    a = arith_prompts(20, seed=3)
    assert a == arith_prompts(20, seed=3)
    assert a != arith_prompts(20, seed=4)
    assert {p.level for p in a} == set(ARITH_LEVELS)
    for p in a:
        expression = p.problem.removeprefix("What is ").removesuffix("?").replace("×", "*")
        assert int(p.answer) == eval(expression)
    assert len({p.prompt_id for p in a}) == 20
    test = {p.problem for p in arith_prompts(20, split="test", seed=3)}
    assert test != {p.problem for p in a}


def test_arith_test_problems_never_appear_in_training():
    # level 1 has 162 problems: without disjoint pools, held-out prompts would repeat training ones
    train = {p.problem for seed in range(3) for p in arith_prompts(100, seed=seed, levels=(1,))}
    test = {p.problem for p in arith_prompts(30, split="test", seed=7, levels=(1,))}
    assert len(train) >= 100 and len(test) == 30 and not train & test
    with pytest.raises(DatasetError, match="cannot draw"):
        arith_prompts(60, split="test", levels=(1,))  # the test pool of level 1 is ~40 problems


def test_arith_level_shapes():
    problem, answer = arith_problem(0, "train", 0, 5)
    assert problem.count(" ") >= 7 and isinstance(answer, int)
    with pytest.raises(DatasetError, match="levels"):
        arith_prompts(3, levels=(9,))


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_math_and_gsm8k_formats(tmp_path):
    math = write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "What is $1+1$?", "answer": "2", "level": 1, "subject": "Algebra", "unique_id": "a"},
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}", "level": 2, "subject": "Algebra", "unique_id": "b"},
    ])
    prompts = file_prompts(math)
    assert [(p.answer, p.level, p.subject, p.unique_id, p.source) for p in prompts] == [
        ("2", 1, "Algebra", "a", "m"), ("\\frac{1}{2}", 2, "Algebra", "b", "m")]
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "Sum?", "answer": "1+1=<<1+1=2>>2\n#### 1,234"}])
    assert file_prompts(gsm)[0].answer == "1234"
    mapped = write_jsonl(tmp_path / "x.jsonl", [{"q": "Q?", "a": "7"}])
    assert file_prompts(mapped, problem_key="q", answer_key="a")[0].answer == "7"
    assert len(load_prompts(str(math), num_prompts=1)) == 1


def test_parquet_input(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["A?", "B?"], "answer": ["1", "2"]}), path)
    assert [p.answer for p in file_prompts(path)] == ["1", "2"]
    pq.write_table(pa.table({"problem": ["A?"], "answer": [[1, 2]]}), path)
    with pytest.raises(DatasetError, match=r"p.parquet:row 1: field 'answer' must be text"):
        file_prompts(path)


@pytest.mark.parametrize("lines, message", [
    ([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}, "{not json"], r"line 3: not valid JSON"),
    ([{"problem": "a", "answer": "1"}, {"answer": "2"}], r"line 2: missing field 'problem'"),
    ([{"problem": "  ", "answer": "1"}], r"line 1: field 'problem' is empty"),
    ([{"problem": "a", "answer": "1", "unique_id": "x"}, {"problem": "b", "answer": "2", "unique_id": "x"}],
     r"line 2: duplicate unique_id 'x' \(first at .*line 1\)"),
    (["[1, 2]"], r"line 1: expected a JSON object"),
    ([{"question": "a", "answer": "no marker"}], r"line 1: field 'answer' has no final '#### N'"),
])
def test_bad_lines_are_named(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DatasetError, match=message) as info:
        file_prompts(path)
    assert str(path) in str(info.value)


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DatasetError, match="line 2: not UTF-8"):
        file_prompts(path)
    with pytest.raises(DatasetError, match="no such file"):
        file_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_prompts("gsm9k")
    with pytest.raises(DatasetError, match="at least 1"):
        load_prompts("arith", num_prompts=0)
