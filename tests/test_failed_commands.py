"""Issue 24 §4: nonsense is refused, and a command that fails writes nothing. Every failing command below
runs inside its own tmp_path, whose whole tree (lock files, logs, store.json included) is hashed before
and after: no new store, no store.json, no prompt row, no lock file, no log."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model

PROBLEMS = [(f"w{a} w{a + 1}", str(a)) for a in range(1, 7)]


def tree(top: Path) -> dict:
    """Every entry under `top`: a file's content hash, or 'dir'."""
    return {str(p.relative_to(top)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*"))}


def refused(result, *details) -> None:
    """Exit 1, one `error:` line holding each detail, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for detail in details:
        assert detail in result.output, (detail, result.output)


def refused_and_nothing_written(top: Path, args, *details) -> None:
    before = tree(top)
    refused(invoke(*args), *details)
    assert tree(top) == before


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "problems.jsonl",
                       [{"problem": p, "answer": a} for p, a in PROBLEMS])


def gen(model, problems, *extra):
    return ["generate", "--engine", "transformers", "--model", model, "--dataset", problems, "--num-prompts", 4,
            "-G", 2, "--max-new-tokens", 4, "--batch-size", 2, *extra]


@pytest.fixture(scope="module")
def made(tmp_path_factory, model, problems):
    """A store with round 0 generated (4 prompts x G 2) and scored, lock files and all."""
    root = tmp_path_factory.mktemp("made") / "store"
    invoke_ok(*gen(model, problems), "--store", root)
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    return root


@pytest.fixture()
def store(made, tmp_path):
    """A private copy of `made` inside this test's tmp_path."""
    root = tmp_path / "store"
    shutil.copytree(made, root)
    return root


# -- generate ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, detail", [
    (["--round", "-1"], "--round must be 0 or more"),  # created a store before
    (["--adapter", "/etc"], "--adapter /etc: not a peft adapter directory"),  # created a store before
    (["--round", "1"], "round 1 samples with the adapter of round 0"),  # created a store before
    (["--temperature", "nan"], "temperature must be >= 0 and finite"),  # stored token ids 0, NaN logprobs
    (["--temperature", "inf"], "temperature must be >= 0 and finite"),
    (["--temperature", "-0.5"], "temperature must be >= 0 and finite"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be an integer >= -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["-G", "0"], "--num-samples must be at least 1"),
])
def test_generate_refuses_bad_settings_and_makes_no_store(tmp_path, model, problems, extra, detail):
    refused_and_nothing_written(tmp_path, [*gen(model, problems, *extra), "--store", tmp_path / "new"], detail)
    assert not (tmp_path / "new").exists()


def test_a_wrong_group_size_adds_no_prompt_rows(store, model, problems):
    # the issue: `--num-prompts 0` (every problem of the file) with another G added the new prompt rows first
    refused_and_nothing_written(store.parent, [*gen(model, problems, "--num-prompts", 0, "-G", 3), "--store", store],
                                "already holds groups of 2 samples", "not --num-samples 3")
    assert Store.open(store).query("SELECT count(*) AS n FROM prompts").column("n")[0].as_py() == 4


@pytest.mark.parametrize("extra, detail", [(["--adapter", "/etc"], "not a peft adapter directory"),
                                           (["--round", "1"], "round 1 samples with the adapter of round 0")])
def test_generate_on_an_existing_store_fails_before_writing(store, model, problems, extra, detail):
    refused_and_nothing_written(store.parent, [*gen(model, problems, *extra), "--store", store], detail)


@pytest.mark.parametrize("extra", [["--adapter", "/etc"], []])
def test_a_directory_that_lost_its_store_json_is_not_made_a_store_again(store, model, problems, extra):
    # the issue: with store.json deleted a failing generate recreated it; now any generate refuses the
    # directory (its rows may be another model's), the failing one and the one that would succeed alike
    (store / "store.json").unlink()
    refused_and_nothing_written(store.parent, [*gen(model, problems, *extra), "--store", store],
                                "is not a replay store (no store.json) and is not empty")
    assert not (store / "store.json").exists()


# -- round ------------------------------------------------------------------------------------------------
def round_args(model, problems, *sets):
    args = ["round", "--set", f"generate.model={model}", "--set", "generate.engine=transformers",
            "--set", f"generate.dataset={problems}", "--set", "generate.num_prompts=2", "--set",
            "generate.num_samples=2", "--set", "generate.max_new_tokens=4", "--set", "score.workers=1"]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("setting, detail", [
    ("learn.objective=nosuch", "unknown --objective 'nosuch'"),  # failed after generate and score ran
    ("learn.window=0", "--window must be at least 1"),
    ("score.workers=0", "--workers must be between 1 and"),
    ("score.timeout=-1", "--timeout must be a positive number"),
    ("generate.temperature=-1", "temperature must be >= 0 and finite"),
    ("generate.top_p=0", "top_p must be in (0, 1]"),
    ("generate.num_samples=0", "--num-samples must be at least 1"),
    ("generate.max_new_tokens=0", "--max-new-tokens must be at least 1"),
    ("generate.shard=2/1", "--shard 2/1: need 0 <= i < n"),
    ("score.chunk_size=0", "chunk_size must be at least 1"),
    ("score.shard=3/2", "--shard 3/2: need 0 <= i < n"),
])
def test_round_checks_every_stage_before_the_first(tmp_path, store, model, problems, setting, detail):
    refused_and_nothing_written(tmp_path, [*round_args(model, problems, setting), "--store", tmp_path / "new"],
                                detail)
    assert not (tmp_path / "new").exists()
    # on a store: generate does not run, rounds.log is not written
    refused_and_nothing_written(tmp_path, [*round_args(model, problems, setting), "--store", store], detail)


def test_a_round_that_fails_in_generate_leaves_no_directory(tmp_path, model, problems):
    # the issue: the failed tick left logs/rounds.log (and its lock) in a directory with no store
    missing = tmp_path / "missing.jsonl"
    refused_and_nothing_written(tmp_path, [*round_args(model, problems, f"generate.dataset={missing}"),
                                           "--store", tmp_path / "new"], "missing.jsonl")
    assert not (tmp_path / "new").exists()


# -- score ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, detail", [
    (["--workers", "100000"], "--workers must be between 1 and"),  # hung starting 100 000 verifier processes
    (["--workers", "0"], "--workers must be between 1 and"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["--round", "-1"], "--round must be 0 or more"),
])
def test_score_refuses_bad_settings_before_its_lock(store, extra, detail):
    refused_and_nothing_written(store.parent, ["score", "--store", store, *extra], detail)


# -- import -----------------------------------------------------------------------------------------------
ROW = {"problem": "w1 w2", "answer": "1", "completion": "\\boxed{1}"}


@pytest.mark.parametrize("rows, detail", [
    ([ROW | {"prompt_id": ""}], "line 1: field 'prompt_id' is empty"),
    ([ROW | {"prompt_id": "   "}], "line 1: field 'prompt_id' is empty"),
    ([ROW | {"prompt_id": {"a": 1}}], "line 1: field 'prompt_id' must be text (or an integer), got dict"),
    ([ROW | {"prompt_id": False}], "line 1: field 'prompt_id' must be text (or an integer), got bool"),
    ([ROW | {"prompt_id": 1.5}], "line 1: field 'prompt_id' must be text (or an integer), got float"),
    ([ROW | {"prompt_id": "x" * 100_000}], "line 1: field 'prompt_id' is 100,000 characters long: at most 256"),
    ([ROW | {"prompt_id": "a\nb"}], "line 1: field 'prompt_id' holds the control character '\\n'"),
    ([ROW | {"prompt_id": "a\x1b[2Jb"}], "line 1: field 'prompt_id' holds the control character '\\x1b'"),
    ([ROW | {"prompt_id": "a\u2028b"}], "line 1: field 'prompt_id' holds the control character '\\u2028'"),
    ([ROW | {"prompt_id": "p1"}, ROW | {"prompt_id": "p1", "problem": "w3 w4"}],
     "line 2: prompt_id 'p1' names the problem 'w3 w4' here but 'w1 w2' at"),
    ([ROW | {"completion_token_ids": [10, 3], "prompt_token_ids": []}], "line 1: prompt_token_ids is empty"),
    ([ROW | {"temperature": "hot"}], "line 1: field temperature must be >= 0 and finite"),
    ([ROW | {"temperature": float("nan")}], "line 1: field temperature must be >= 0 and finite"),
    ([ROW | {"top_p": 0.9}], "line 1: top_p/top_k without a temperature"),
    ([ROW | {"temperature": 0.7, "top_k": 2.5}], "line 1: field top_k must be an integer >= -1"),
])
def test_import_refuses_bad_rows_and_makes_no_store(tmp_path, model, rows, detail):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    refused_and_nothing_written(tmp_path, ["import", path, "--store", tmp_path / "new", "--tokenizer", model],
                                str(path), detail)
    assert not (tmp_path / "new").exists()


def test_two_problems_under_one_id_name_both_rows(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROW | {"prompt_id": "p1"}, ROW | {"prompt_id": "p2"},
                                                 ROW | {"prompt_id": "p1", "problem": "w3 w4"}])
    refused_and_nothing_written(tmp_path, ["import", path, "--store", tmp_path / "new"],
                                f"{path}:line 3: prompt_id 'p1'", f"at {path}:line 1: one id, one problem")


@pytest.mark.parametrize("extra, detail", [
    (["--round", "-1"], "--round must be 0 or more"),
    (["--temperature", "nan"], "temperature must be >= 0 and finite"),
    (["--temperature", "1", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["--top-k", "5"], "--top-p/--top-k without --temperature"),
    (["--logprobs-mode", "logits"], "unknown --logprobs-mode 'logits'"),
])
def test_import_refuses_bad_flags(tmp_path, extra, detail):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROW])
    refused_and_nothing_written(tmp_path, ["import", path, "--store", tmp_path / "new", *extra], detail)


def test_a_row_setting_that_contradicts_the_flag_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROW, ROW | {"completion": "x", "temperature": 0.7}])
    refused_and_nothing_written(tmp_path, ["import", path, "--store", tmp_path / "new", "--temperature", "1"],
                                "line 2: field 'temperature' is 0.7 but --temperature is 1.0")


def test_an_id_the_store_holds_for_another_problem_is_refused(store):
    pid = Store.open(store).query("SELECT prompt_id FROM prompts ORDER BY prompt_id LIMIT 1").column(0)[0].as_py()
    path = write_jsonl(store.parent / "rows.jsonl", [ROW | {"prompt_id": "fresh"}, ROW | {"prompt_id": pid,
                                                                                          "problem": "w9 w9"}])
    refused_and_nothing_written(store.parent, ["import", path, "--store", store, "--round", 1],
                                f"line 2: prompt_id '{pid}' names the problem 'w9 w9' here but", "store's prompts")


def test_plain_and_integer_ids_are_kept(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROW | {"prompt_id": "gsm8k/17"}, ROW | {"prompt_id": 17,
                                                                                        "problem": "w3 w4"}])
    invoke_ok("import", path, "--store", tmp_path / "s")
    ids = Store.open(tmp_path / "s").query("SELECT DISTINCT prompt_id FROM rollouts ORDER BY 1").column(0)
    assert ids.to_pylist() == ["17", "gsm8k/17"]


# -- locks ------------------------------------------------------------------------------------------------
def test_a_refused_copy_on_a_new_path_leaves_the_holders_lock_alone(tmp_path, model, problems):
    # a generate that is refused because another holds the round of a store not made yet must not remove
    # the holder's lock file on its way out (a third copy would then lock a new file and run beside it)
    from replay.locks import lock_path, stage_lock

    root = tmp_path / "new"
    with stage_lock(root, 0, "rollouts", "generate"):
        refused(invoke(*gen(model, problems), "--store", root), "another process is writing that round")
        assert lock_path(root, 0, "rollouts").exists()


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again(tmp_path, monkeypatch):
    # a run that fails removes the lock file it made while it holds it; whoever opened that file meanwhile
    # must not keep a lock on a file that is no longer the lock
    import os

    import replay.locks as locks

    root, real, calls = tmp_path / "store", locks.open_lock, []

    def opened_then_removed(root_, path):
        fd = real(root_, path)
        calls.append(path)
        if len(calls) == 1:
            path.unlink()  # the failed run's cleanup, between this open and the flock
        return fd

    monkeypatch.setattr(locks, "open_lock", opened_then_removed)
    path = locks.lock_path(root, 0, "rollouts")
    with locks.stage_lock(root, 0, "rollouts", "generate"):
        assert len(calls) == 2 and path.exists()
        assert os.stat(path).st_size > 0  # the holder's name went into the file that is the lock now
