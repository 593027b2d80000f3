"""`replay import` with token ids: ids are checked against the model's vocabulary (file, line, field),
missing prompt ids are derived with the chat template generate uses, and learn trains on the
imported rows exactly as on generated ones (import -> score -> learn, with and without recompute)."""

import json

import pytest

from replay.prompting import chat_prompt_ids
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model, tiny_tokenizer

PROBLEMS = [(f"w{a} w{a + 1}", str(a)) for a in range(1, 5)]


def rows(with_prompt_ids=False):
    out = []
    for problem, answer in PROBLEMS:
        for i, text in enumerate([f"\\boxed{{{answer}}}", "\\boxed{99}", "no idea"]):
            row = {"problem": problem, "answer": answer, "completion": text,
                   "completion_token_ids": [10 + i, 11, 12 + i, 3],  # the tiny vocabulary's words, then EOS
                   "completion_logprobs": [-0.5, -1.0, -0.25, -0.1]}
            if with_prompt_ids:
                row["prompt_token_ids"] = [4, 5, 6 + i]
            out.append(row)
    return out


def write(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def learn(root, model, *extra):
    return invoke_ok("learn", "--store", root, "--round", 0, "--model", model, "--micro-batch-size", 4,
                     "--grad-accum", 1, "--lr", "1e-3", *extra)


def test_import_score_learn_with_completion_ids_only(tmp_path, model):
    root = tmp_path / "store"
    out = invoke_ok("import", write(tmp_path / "rows.jsonl", rows()), "--store", root, "--tokenizer", model,
                    "--temperature", 1)  # the logprobs' distribution: T = 1, nothing cut
    assert "imported 12 rollouts" in out
    store = Store.open(root)
    stored = store.query("SELECT prompt_id, prompt_token_ids, completion_token_ids FROM rollouts "
                         "ORDER BY prompt_id, sample_idx").to_pylist()
    problems = {r["prompt_id"]: r["problem"] for r in store.query("SELECT prompt_id, problem FROM prompts").to_pylist()}
    for row in stored:  # derived exactly as generate builds a prompt
        assert row["prompt_token_ids"] == chat_prompt_ids(tiny_tokenizer(), problems[row["prompt_id"]])
    assert store.read_manifest(0, "import")["counts"]["prompt_token_ids_derived"] == 12
    assert store.meta["base_model"] == str(model.absolute())
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    out = learn(root, model)
    audit = store.query("SELECT count(*) AS n, sum(num_tokens) AS tokens FROM learn_audit").to_pylist()
    assert audit == [{"n": 12, "tokens": 48}]  # the imported ids, 4 per completion


def test_given_prompt_ids_are_kept_and_recompute_uses_the_given_ids(tmp_path, model):
    root = tmp_path / "store"
    invoke_ok("import", write(tmp_path / "rows.jsonl", rows(with_prompt_ids=True)), "--store", root,
              "--tokenizer", model)
    store = Store.open(root)
    assert {tuple(r["prompt_token_ids"]) for r in store.query("SELECT prompt_token_ids FROM rollouts").to_pylist()} \
        == {(4, 5, 6), (4, 5, 7), (4, 5, 8)}
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    learn(root, model, "--recompute-old-logprobs")
    # the text "no idea" would tokenize to other ids and lengths: the stored ids are what trained
    assert store.query("SELECT sum(num_tokens) AS t FROM learn_audit").to_pylist() == [{"t": 48}]


@pytest.mark.parametrize("field,bad", [("completion_token_ids", 51), ("completion_token_ids", 10**9),
                                       ("prompt_token_ids", 51)])
def test_out_of_vocabulary_ids_are_refused_by_file_line_and_field(tmp_path, model, field, bad):
    items = rows(with_prompt_ids=True)
    items[4][field] = items[4][field][:1] + [bad] + items[4][field][2:]
    path = write(tmp_path / "rows.jsonl", items)
    result = invoke("import", path, "--store", tmp_path / "store", "--tokenizer", model)
    assert result.exit_code == 1
    assert f"{path}:line 5: {field}[1] is {bad}, outside the vocabulary of" in result.output
    assert "(51 tokens" in result.output and not (tmp_path / "store").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad", [49152, 10**9])
def test_out_of_vocabulary_ids_for_smollm2_are_refused(tmp_path, bad):
    # the issue's reproduction: SmolLM2's vocabulary has 49 152 tokens (the default model)
    items = [{"problem": "1+1?", "answer": "2", "completion": "2", "completion_token_ids": [17, bad]}]
    result = invoke("import", write(tmp_path / "rows.jsonl", items), "--store", tmp_path / "store")
    assert result.exit_code == 1 and f"completion_token_ids[1] is {bad}, outside the vocabulary of smollm2-135m " \
                                      "(49152 tokens" in result.output


def test_prompt_ids_without_completion_ids_and_a_store_of_another_model_are_refused(tmp_path, model):
    items = [{"problem": "w1", "answer": "1", "completion": "x", "prompt_token_ids": [4, 5]}]
    result = invoke("import", write(tmp_path / "a.jsonl", items), "--store", tmp_path / "s")
    assert result.exit_code == 1 and "line 1: prompt_token_ids without completion_token_ids" in result.output
    Store.create(tmp_path / "other", base_model="some-other-model")
    result = invoke("import", write(tmp_path / "b.jsonl", rows()), "--store", tmp_path / "other", "--tokenizer", model)
    assert result.exit_code == 1 and "made with base model 'some-other-model'" in result.output
