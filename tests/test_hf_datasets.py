"""Hugging Face `datasets` input: save_to_disk directories (Dataset and DatasetDict), hub ids with a
clear error when the hub is off, and the same field mapping and row-precise errors as JSONL."""

import json

import pytest

from replay.datasets import DatasetError, file_prompts, load_prompts
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model

datasets = pytest.importorskip("datasets", reason="datasets not installed (pip install 'replay-rlvr[hf]')")

ROWS = [{"problem": "What is 2 + 3?", "answer": "5", "level": "Level 1", "subject": "Algebra", "unique_id": "a"},
        {"problem": "What is 7 * 6?", "answer": "42", "level": "2", "subject": "Algebra", "unique_id": "b"},
        {"problem": "Solve x + 1 = 3.", "answer": "2", "level": "Level 3", "subject": None, "unique_id": "c"}]


def save(tmp_path, name, rows=ROWS, splits=None):
    path = tmp_path / name
    if splits is None:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(path))
    return path


def test_a_saved_dataset_gives_the_prompts_of_the_same_rows_as_jsonl(tmp_path):
    directory = save(tmp_path, "math")
    (tmp_path / "files").mkdir()
    jsonl = tmp_path / "files" / "math.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from_hf = load_prompts(str(directory))
    assert from_hf == file_prompts(jsonl)  # same source name, so the same prompt ids
    assert [p.level for p in from_hf] == [1, 2, 3] and from_hf[2].subject is None
    assert len(load_prompts(str(directory), num_prompts=2)) == 2


def test_dataset_dict_split_and_key_mapping(tmp_path):
    rows = [{"question": "Q1 text", "final": "7"}, {"question": "Q2 text", "final": "8"}]
    directory = save(tmp_path, "qa", splits={"train": rows[:1], "test": rows[1:]})
    test = load_prompts(str(directory), split="test", problem_key="question", answer_key="final")
    assert [(p.problem, p.answer, p.split) for p in test] == [("Q2 text", "8", "test")]
    train = load_prompts(str(directory), split="other", dataset_split="train", problem_key="question",
                         answer_key="final")
    assert [(p.problem, p.split) for p in train] == [("Q1 text", "other")]  # read train, label other
    with pytest.raises(DatasetError, match=r"qa: no split 'valid'; it has test, train"):
        load_prompts(str(directory), split="valid", problem_key="question", answer_key="final")


def test_gsm8k_fields_in_a_saved_dataset(tmp_path):
    directory = save(tmp_path, "gsm", rows=[{"question": "Tom has 3 apples...", "answer": "3 + 4 = 7\n#### 1,007"}])
    (prompt,) = load_prompts(str(directory))
    assert prompt.answer == "1007"


@pytest.mark.parametrize("rows, message", [
    ([ROWS[0], {"problem": "x", "answer": None}], r"gsm \[train\] row 2: field 'answer' is null"),
    ([ROWS[0], ROWS[1], {"problem": "  ", "answer": "1"}], r"gsm \[train\] row 3: field 'problem' is empty"),
    ([ROWS[0], {"problem": "x", "answer": "1", "level": "hard"}], r"row 2: field 'level' must be an integer"),
])
def test_bad_rows_are_named_by_split_and_row(tmp_path, rows, message):
    directory = save(tmp_path, "gsm", splits={"train": rows})
    with pytest.raises(DatasetError, match=message):
        load_prompts(str(directory))


def test_a_directory_that_is_no_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hello")
    with pytest.raises(DatasetError, match="junk: not a Hugging Face dataset directory"):
        load_prompts(str(tmp_path / "junk"))


def test_hub_id_with_the_hub_off_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=r"cannot load dataset nobody/no-such-set \(main\) \[test\] from the "
                                           r"Hugging Face Hub: the hub is off .*save_to_disk"):
        load_prompts("nobody/no-such-set", split="train", dataset_config="main", dataset_split="test")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_prompts("data/missing.csv")


def test_generate_from_a_saved_dataset(tmp_path):
    directory = save(tmp_path, "math", splits={"train": ROWS, "test": ROWS[:1]})
    store = tmp_path / "store"
    model = save_tiny_model(tmp_path / "tiny")
    out = invoke_ok("generate", "--store", store, "--dataset", directory, "--num-prompts", 0, "-G", 2,
                    "--max-new-tokens", 3, "--engine", "transformers", "--model", model, "--quiet")
    assert "3 groups written (6 rollouts" in out
    problems = Store.open(store).query("SELECT problem FROM prompts ORDER BY problem").column(0).to_pylist()
    assert problems == sorted(r["problem"] for r in ROWS)
    bad = invoke("generate", "--store", store, "--dataset", directory, "--split", "dev", "--engine", "transformers",
                 "--model", model)
    assert bad.exit_code == 1 and "no split 'dev'; it has test, train" in bad.output
