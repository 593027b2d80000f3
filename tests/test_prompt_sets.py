"""Prompt sets chosen by SQL (`--prompts`) for generate and eval, and rescue sampling: a group that is
already stored grows by -G samples, with fresh indices and seeds, resumably and only once."""

import hashlib
import signal
import subprocess
import sys

import pytest

from replay.read.doctor import diagnose
from replay.prompt_sets import set_id
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model
from tests.test_round import DRIVER

NEGATIVES = "select prompt_id from negative_groups where round = 0"
GEN = ["--engine", "transformers", "--max-new-tokens", 4, "--batch-size", 1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def scored(tmp_path, model):
    """Round 0: 6 arithmetic prompts x 4 samples of the tiny model, scored (its words never verify)."""
    root = tmp_path / "store"
    invoke_ok("generate", "--store", root, "--model", model, "--round", 0, "--num-prompts", 6, "-G", 4,
              "--levels", "1", *GEN)
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    return Store.open(root)


def keys_and_seeds(store):
    return store.query("SELECT prompt_id, sample_idx, seed FROM rollouts WHERE round = 0 ORDER BY ALL").to_pylist()


def test_rescue_sampling_grows_each_negative_group_once(scored, model):
    store = scored
    negatives = store.query(NEGATIVES).column("prompt_id").to_pylist()
    assert len(negatives) == 6
    before = keys_and_seeds(store)
    out = invoke_ok("generate", "--store", store.root, "--model", model, "--round", 0, "--prompts", NEGATIVES,
                    "-G", 4, *GEN)
    assert "6 groups written (24 rollouts" in out
    after = keys_and_seeds(store)
    assert [r for r in after if r["sample_idx"] < 4] == before  # stored samples untouched
    assert sorted({r["sample_idx"] for r in after}) == list(range(8))
    assert len({(r["prompt_id"], r["sample_idx"]) for r in after}) == len(after) == 48
    assert len({r["seed"] for r in after}) == 48
    stage = f"generate.{set_id(negatives)}-k4"
    record = store.read_manifest(0, stage)
    assert record["status"] == "complete" and record["plan"] == {pid: 4 for pid in negatives}
    assert store.read_manifest(0, "generate")["counts"]["rollouts_written"] == 24  # the round's own manifest
    # a rerun adds nothing: the plan, not the groups' present size, says where the run's samples start
    again = invoke_ok("generate", "--store", store.root, "--model", model, "--round", 0, "--prompts", NEGATIVES,
                      "-G", 4, *GEN)
    assert "0 groups written" in again and keys_and_seeds(store) == after
    invoke_ok("score", "--store", store.root, "--round", 0, "--workers", 1)
    sizes = store.query("SELECT n, count(*) AS groups FROM groups WHERE round = 0 GROUP BY n").to_pylist()
    assert sizes == [{"n": 8, "groups": 6}]
    assert diagnose(store.root).problems == []
    (sql_row,) = store.query("SELECT sql, n_prompts, prompt_ids FROM prompt_sets").to_pylist()
    assert sql_row == {"sql": NEGATIVES, "n_prompts": 6, "prompt_ids": sorted(negatives)}


def test_a_killed_rescue_is_finished_by_the_rerun_exactly(scored, model, tmp_path):
    store = scored
    args = ["generate", "--store", store.root, "--model", model, "--round", 0, "--prompts", NEGATIVES, "-G", 4, *GEN]
    killed = subprocess.run([sys.executable, "-c", DRIVER, "stages.generate", "rollout_rows", "3", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = store.query("SELECT count(*) AS n FROM rollouts").column("n")[0].as_py()
    assert 24 < partial < 48  # two groups extended, the rest not
    problems = diagnose(store.root).problems
    assert all(p.severity == "warning" for p in problems)
    assert any("did not finish" in p.message for p in problems), problems
    invoke_ok(*args)
    rows = keys_and_seeds(store)
    assert len(rows) == 48 and len({(r["prompt_id"], r["sample_idx"]) for r in rows}) == 48
    invoke_ok(*args)
    assert len(keys_and_seeds(store)) == 48


def test_doctor_flags_a_group_that_breaks_its_plan(scored, model):
    store = scored
    invoke_ok("generate", "--store", store.root, "--model", model, "--round", 0, "--prompts", NEGATIVES, "-G", 2, *GEN)
    invoke_ok("score", "--store", store.root, "--round", 0, "--workers", 1)
    assert diagnose(store.root).problems == []
    victim = store.files("rollouts", 0)[-1]  # the last part: one prompt's two added samples
    victim.unlink()
    problems = diagnose(store.root).errors
    assert any("its plan in generate.ps-" in p.message and "says 6" in p.message for p in problems), problems


def test_prompts_on_a_fresh_round_and_from_other_queries(scored, model):
    store = scored
    two = "select prompt_id from prompts order by prompt_id limit 2"
    out = invoke_ok("generate", "--store", store.root, "--model", model, "--round", 1, "--adapter", "none",
                    "--prompts", two, "-G", 3, *GEN)
    assert "2 groups written (6 rollouts" in out
    sizes = store.query("SELECT prompt_id, count(*) AS n FROM rollouts WHERE round = 1 GROUP BY 1").to_pylist()
    assert sorted(r["n"] for r in sizes) == [3, 3]


@pytest.mark.parametrize("query,detail", [
    ("select 1; copy (select 1) to 'pwn.csv'", "one statement at a time"),
    ("explain /* analyze select 1 --*/ analyze copy (select 1 as x) to 'pwn.csv'", "EXPLAIN of a COPY"),
    ("select content from read_text('/etc/passwd')", "disabled by configuration"),
    ("select round, n from groups", "must return a prompt_id column"),
    ("select 'nope' as prompt_id", "not prompts of"),
    ("select prompt_id from negative_groups where round = 99", "returned no prompt ids"),
])
def test_bad_or_hostile_prompt_queries_are_refused_and_write_nothing(scored, model, tmp_path, monkeypatch, query,
                                                                     detail):
    store = scored
    monkeypatch.chdir(tmp_path)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*")
              if p.is_file() and ".locks" not in p.parts}
    for command in (["generate", "--model", model, "--round", 0, "-G", 2, *GEN], ["eval", "--round", -1]):
        result = invoke(*command, "--store", store.root, "--prompts", query)
        assert result.exit_code == 1 and detail in result.output, result.output
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*")
             if p.is_file() and ".locks" not in p.parts}
    assert after == before


def test_eval_on_a_prompt_set_records_it_and_rescue_eval_reports_it(scored, model):
    store = scored
    out = invoke_ok("eval", "--store", store.root, "--base", "--prompts", NEGATIVES, "--num-samples", 2,
                    "--engine", "transformers", "--max-new-tokens", 4, "--batch-size", 1, "--workers", 1)
    assert "pass@k" in out
    negatives = store.query(NEGATIVES).column("prompt_id").to_pylist()
    ps = set_id(negatives)
    assert (store.root / "evals" / f"base-{ps}" / "store.json").exists()
    sub = Store.open(store.root / "evals" / f"base-{ps}")
    assert sorted(sub.query("SELECT DISTINCT prompt_id FROM rollouts").column(0).to_pylist()) == sorted(negatives)
    rows = store.query("SELECT prompt_set_id, prompt_set_sql, n_prompts, k, pass_at_k, solved_share FROM rescue_eval "
                       "ORDER BY k").to_pylist()
    assert [r["k"] for r in rows] == [1, 2] and all(r["prompt_set_id"] == ps for r in rows)
    assert rows[0]["prompt_set_sql"] == NEGATIVES and rows[0]["n_prompts"] == 6
    assert rows[0]["solved_share"] == rows[1]["pass_at_k"]  # solved at least once in n = pass@n
    assert diagnose(store.root).problems == []
