"""Issue 24 §5: a stage refuses while the stage it depends on holds its lock or is unfinished (manifests
say which), unless told --partial; doctor reports a round whose verdicts do not cover its rollouts; and
imported logprobs of unknown sampling are refused by learn unless --recompute-old-logprobs."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from replay import keys
from replay.locks import stage_lock
from replay.read.doctor import diagnose
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model
from tests.test_round import DRIVER

ENV = dict(os.environ, REPLAY_TORCH_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")
PROBLEMS = [{"problem": f"w{a} w{a + 1}", "answer": str(a)} for a in range(1, 25)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def gen(model, problems, prompts, samples, *extra):
    return ["generate", "--engine", "transformers", "--model", model, "--dataset", problems, "--num-prompts",
            prompts, "-G", samples, "--max-new-tokens", 4, *extra]


def learn(root, *extra):
    return invoke("learn", "--store", root, "--round", 0, "--micro-batch-size", 8, "--grad-accum", 1, "--lr", "1e-3",
                  *extra)


def one_error_line(result, *details):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for detail in details:
        assert detail in result.output, (detail, result.output)


def count(store, sql):
    return store.query(sql).column(0)[0].as_py()


def trained(store, name="main"):
    return store.query("SELECT count(*) AS n, count(DISTINCT prompt_id) AS groups FROM learn_audit WHERE "
                       "adapter_name = ?", [name]).to_pylist()[0]


# generate, paused after its first part file until a file appears: "score while generate still writes"
PAUSED = textwrap.dedent("""
    import os, sys, time
    import replay.store
    go, real, parts = sys.argv[1], replay.store.Store.write, []
    def write(self, table, data, **kw):
        out = real(self, table, data, **kw)
        if table == "rollouts":
            parts.append(1)
            if len(parts) == 1:
                print("paused", flush=True)
                while not os.path.exists(go):
                    time.sleep(0.05)
        return out
    replay.store.Store.write = write
    from replay.cli import app
    app(sys.argv[2:])
""")


def test_score_while_generate_writes_the_round_is_refused_then_learn_refuses_the_partial_score(tmp_path, model,
                                                                                                problems):
    # the issue: score beside a running generate was recorded complete with 16 of 48 rollouts scored (doctor
    # ok), and a direct learn then trained on a third of the groups
    root, go = tmp_path / "store", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", PAUSED, str(go), *map(str, gen(model, problems, 24, 2,
                                                                                      "--batch-size", 8)),
                               "--store", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=ENV)
    try:
        lines = []
        while (line := writer.stdout.readline()) and line.strip() != "paused":
            lines.append(line)
        assert line.strip() == "paused", "".join(lines)
        store = Store.open(root)
        assert count(store, "SELECT count(*) FROM rollouts") == 16  # 8 of 24 groups written, the rest in hand
        one_error_line(invoke("score", "--store", root, "--workers", 1), "round 0 is still being written",
                       f"(generate, pid {writer.pid} on ", "--partial")
        assert not store.files("verdicts") and store.read_manifest(0, "score") is None
        # told --partial, it scores what is stored now
        assert "scored 16" in invoke_ok("score", "--store", root, "--workers", 1, "--partial")
        assert store.read_manifest(0, "score")["config"]["partial"] is True
    finally:
        go.touch()
        output = writer.communicate(timeout=300)[0]
    assert writer.returncode == 0, output
    assert count(store, "SELECT count(*) FROM rollouts") == 48
    # learn refuses the round a third of which is scored, naming it and both ways on; nothing is written
    one_error_line(learn(root), "round 0: 32 of its 48 rollouts have no verdict", "replay score --round R",
                   "--partial")
    assert not store.adapter_dir(0).exists() and store.read_manifest(0, "learn") is None
    assert not (root / ".locks" / "round=0" / "learn.main.lock").exists()  # a refused learn leaves no lock
    # doctor reports it (a warning: a late generate is a normal state until the next score)
    problems = diagnose(root).problems
    (problem,) = [p for p in problems if "have no verdict" in p.message]
    assert problem.severity == "warning" and "round 0: 32 of its 48 rollouts have no verdict, though score.json " \
                                              "recorded a complete score" in problem.message
    assert not diagnose(root).errors
    assert "32 of its 48 rollouts have no verdict" in invoke_ok("doctor", "--store", root)
    # scoring the rest makes the round whole: doctor is clean, learn trains on every group
    assert "scored 32" in invoke_ok("score", "--store", root, "--workers", 1)
    assert diagnose(root).problems == []
    assert "on 48 samples in 24 groups" in learn(root).output
    assert trained(store) == {"n": 48, "groups": 24}


def test_learn_after_one_of_two_score_shards(tmp_path, model, problems):
    # the issue: after scoring only shard 0/2, learn trained on 8 of 16 groups without a word and later said
    # "already complete"
    root = tmp_path / "store"
    invoke_ok(*gen(model, problems, 16, 2), "--store", root)
    invoke_ok("score", "--store", root, "--workers", 1, "--shard", "0/2")
    store = Store.open(root)
    pids = store.query("SELECT DISTINCT prompt_id FROM rollouts").column(0).to_pylist()
    first = sum(keys.in_shard(pid, 0, 2) for pid in pids)
    assert 0 < first < 16
    one_error_line(learn(root), f"round 0: {2 * (16 - first)} of its 32 rollouts have no verdict",
                   "score --shard 1/2 (no manifest) did not finish", "--partial")
    assert not store.adapter_dir(0).exists()
    # --partial trains on the fully scored groups and says what it left out, then and later
    out = learn(root, "--partial")
    assert out.exit_code == 0, out.output
    assert f"in {first} groups" in out.output and f"--partial: {16 - first} groups of the window left out" in out.output
    assert trained(store) == {"n": 2 * first, "groups": first}
    invoke_ok("score", "--store", root, "--workers", 1, "--shard", "1/2")
    again = learn(root).output
    assert "already complete" in again and f"--partial: {16 - first} groups of the window left out" in again
    # the whole round, now scored, trains on every group
    assert "in 16 groups" in learn(root, "--adapter-name", "whole").output


def test_learn_refuses_while_a_stage_holds_the_round(tmp_path, model, problems):
    root = tmp_path / "store"
    invoke_ok(*gen(model, problems, 4, 2), "--store", root)
    invoke_ok("score", "--store", root, "--workers", 1)
    for table, stage in (("verdicts", "score"), ("rollouts", "generate")):
        with stage_lock(root, 0, table, stage):
            one_error_line(learn(root), f"round 0: {stage}, pid {os.getpid()} on ", f"is writing its {table}",
                           "--partial")
    assert not Store.open(root).adapter_dir(0).exists()
    assert learn(root).exit_code == 0


def test_score_refuses_a_round_whose_generate_did_not_finish(tmp_path, model, problems):
    root = tmp_path / "store"
    args = gen(model, problems, 6, 2, "--batch-size", 1)
    killed = subprocess.run([sys.executable, "-c", DRIVER, "stages.generate", "rollout_rows", "3",
                             *map(str, args), "--store", str(root)], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    store = Store.open(root)
    assert count(store, "SELECT count(DISTINCT prompt_id) FROM rollouts") == 2  # of 6, and no manifest
    one_error_line(invoke("score", "--store", root, "--workers", 1),
                   "round 0 has rollouts but no generate or import manifest", "rerun that generate", "--partial")
    assert not store.files("verdicts")
    invoke_ok(*args, "--store", root)  # the rerun finishes the round
    assert "scored 12" in invoke_ok("score", "--store", root, "--workers", 1)


def test_score_refuses_a_sharded_generate_with_a_shard_missing(tmp_path, model, problems):
    root = tmp_path / "store"
    invoke_ok(*gen(model, problems, 8, 2, "--shard", "0/2"), "--store", root)
    one_error_line(invoke("score", "--store", root, "--workers", 1), "round 0 is not completely written",
                   "generate --shard 1/2 (no manifest)")
    invoke_ok(*gen(model, problems, 8, 2, "--shard", "1/2"), "--store", root)
    assert "scored 16" in invoke_ok("score", "--store", root, "--workers", 1)


def test_a_manifest_that_is_not_complete_stops_score_and_learn(tmp_path, model, problems):
    root = tmp_path / "store"
    invoke_ok(*gen(model, problems, 4, 2), "--store", root)
    invoke_ok("score", "--store", root, "--workers", 1)
    store = Store.open(root)
    record = store.read_manifest(0, "generate")
    store.write_manifest(0, "generate", record | {"status": "running"})  # as a prompt-set plan before sampling
    one_error_line(invoke("score", "--store", root, "--workers", 1, "--rescore"), "round 0 is not completely written",
                   "generate (its manifest says 'running')")
    one_error_line(learn(root), "round 0: generate (its manifest says 'running') did not finish", "--partial")
    assert learn(root, "--partial").exit_code == 0


# -- imported logprobs: sampling settings ------------------------------------------------------------------
SAMPLED = ("--temperature", "0.7", "--top-k", "5", "--top-p", "0.8")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, problems):
    """Rollouts sampled at T 0.7 / top-k 5 / top-p 0.8, written out as import rows (ids and logprobs)."""
    tmp = tmp_path_factory.mktemp("exported")
    invoke_ok(*gen(model, problems, 4, 4, *SAMPLED), "--max-new-tokens", 6, "--store", tmp / "source")
    rows = Store.open(tmp / "source").query(
        "SELECT p.problem, p.answer, r.completion_text AS completion, r.prompt_token_ids, r.completion_token_ids, "
        "r.completion_logprobs FROM rollouts r JOIN prompts p USING (prompt_id) ORDER BY r.prompt_id, "
        "r.sample_idx").to_pylist()
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def imported(tmp_path, model, path, *flags):
    root = tmp_path / "store"
    out = invoke_ok("import", path, "--store", root, "--tokenizer", model, *flags)
    invoke_ok("score", "--store", root, "--workers", 1)
    return root, out


def step0(root):
    return Store.open(root).query("SELECT ratio_mean FROM learn_metrics ORDER BY step LIMIT 1").to_pylist()[0]


def test_imported_logprobs_of_unknown_sampling_are_refused_unless_recomputed(tmp_path, model, exported):
    # the issue: stored as 'unknown' and read as T = 1, nothing cut: step-0 ratio_mean 0.80, no word
    root, out = imported(tmp_path, model, exported)
    assert "16 rows carry logprobs but no sampling settings (logprobs_mode 'unknown')" in out
    one_error_line(learn(root), "16 selected rollouts carry logprobs of unknown sampling",
                   "--recompute-old-logprobs", "--temperature/--top-p/--top-k")
    assert not Store.open(root).adapter_dir(0).exists()
    assert learn(root, "--recompute-old-logprobs").exit_code == 0
    assert step0(root)["ratio_mean"] == pytest.approx(1.0, abs=1e-3)


def test_imported_sampling_settings_are_recorded_and_make_the_ratio_exact(tmp_path, model, exported):
    root, _ = imported(tmp_path, model, exported, *SAMPLED)
    store = Store.open(root)
    settings = store.query("SELECT DISTINCT logprobs_mode, round(temperature::DOUBLE, 4) AS t, top_k, "
                           "round(top_p::DOUBLE, 4) AS p FROM rollouts").to_pylist()
    assert settings == [{"logprobs_mode": "processed", "t": 0.7, "top_k": 5, "p": 0.8}]
    assert learn(root).exit_code == 0
    assert step0(root)["ratio_mean"] == pytest.approx(1.0, abs=1e-3)


def test_settings_of_the_wrong_distribution_show_in_the_ratio(tmp_path, model, exported):
    # what reading those rows as T = 1 does (the old 'unknown' rule): the ratio is far from 1 at step 0
    root, _ = imported(tmp_path, model, exported, "--temperature", "1")
    assert learn(root).exit_code == 0
    assert abs(step0(root)["ratio_mean"] - 1.0) > 0.05


def test_row_fields_carry_the_settings(tmp_path, model, exported):
    rows = [dict(json.loads(line), temperature=0.7, top_k=5, top_p=0.8) for line in exported.read_text().splitlines()]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root, out = imported(tmp_path, model, path, "--temperature", "0.7")  # the flag agrees with every row
    assert "note" not in out
    assert learn(root).exit_code == 0
    assert step0(root)["ratio_mean"] == pytest.approx(1.0, abs=1e-3)


def test_raw_logprobs_are_recorded_raw(tmp_path, model, exported):
    root, out = imported(tmp_path, model, exported, "--logprobs-mode", "raw")
    assert "note" not in out
    modes = Store.open(root).query("SELECT DISTINCT logprobs_mode, temperature FROM rollouts").to_pylist()
    assert modes == [{"logprobs_mode": "raw", "temperature": None}]
