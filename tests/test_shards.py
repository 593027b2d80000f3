"""Scale-out by `--shard i/n`, as docs/SCALING.md claims it: generate workers and score workers,
each a separate process, all running at once against one store, give exactly the rows of one
unsharded run, in disjoint part files; one learn then trains on all of it, and `replay doctor`
passes the store."""

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime

import pytest
from typer.testing import CliRunner

from replay import keys, summary
from replay.cli import app
from replay.read.doctor import diagnose
from replay.errors import ReplayError
from replay.read.inspect import stage_status
from replay.store import HOST_TAG, Store, clean_temp_files
from tests._tiny_model import save_tiny_model

N = 3  # generate workers
SCORE_N = 2  # score workers: the split is by prompt_id, so it need not match generate's
G = 3
# --batch-size 1: each engine call holds one prompt's G samples in both runs, so even the float noise
# of padding next to other prompts is the same and the logprobs match exactly
GENERATE = ["generate", "--round", 0, "--num-prompts", 9, "-G", G, "--max-new-tokens", 6, "--engine",
            "transformers", "--levels", "1", "--seed", 5, "--batch-size", 1]
# Imported completions with known verdicts (the tiny model's words never hold a boxed answer).
IMPORTED = [(f"What is {a} + {a}?", str(2 * a), [f"\\boxed{{{2 * a}}}", f"\\boxed{{{2 * a + 1}}}", "no idea"])
            for a in range(1, 7)]
ROLLOUT_COLUMNS = ("prompt_id, sample_idx, rollout_id, seed, prompt_token_ids, completion_token_ids, "
                   "completion_logprobs, sum_logprob, completion_text, finish_reason")
VERDICT_COLUMNS = "round, prompt_id, sample_idx, correct, reward, status, extracted_answer"

# Starts one process per worker at once. They are forked from one launcher after its imports, so the
# test pays for importing torch once, not n times; each then runs its CLI commands on its own, and
# reports whether torch was ever imported in it.
LAUNCHER = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    from replay.cli import app
    for module in sys.argv[1].split(","):
        importlib.import_module(module)
    children = []
    for commands in json.loads(sys.argv[2]):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for args in commands:
                    app(args, standalone_mode=False)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            os.write(1, f"torch imported: {'torch' in sys.modules}\\n".encode())  # one write: no interleaving
            os._exit(code)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    print("worker exit codes:", codes)
    sys.exit(any(codes))
""")

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def run_workers(commands_per_worker, preload=("stages.score",)):
    """Run each worker's list of CLI commands in its own process, all at once; return the output."""
    env = dict(os.environ, REPLAY_TORCH_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    commands = [[[str(a) for a in args] for args in worker] for worker in commands_per_worker]
    result = subprocess.run([sys.executable, "-c", LAUNCHER, ",".join(preload), json.dumps(commands)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def import_known_completions(store_root, tmp_path):
    path = tmp_path / "known.jsonl"
    path.write_text("".join(json.dumps({"problem": p, "answer": a, "completion": c}) + "\n"
                            for p, a, completions in IMPORTED for c in completions))
    invoke("import", path, "--store", store_root, "--round", 1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(single, sharded): the same work done by one process each stage, and by N workers each stage."""
    tmp = tmp_path_factory.mktemp("shards")
    model = save_tiny_model(tmp / "tiny")
    single, sharded = tmp / "single", tmp / "sharded"
    invoke(*GENERATE, "--model", model, "--store", single)
    run_workers([[[*GENERATE, "--model", model, "--store", sharded, "--shard", f"{i}/{N}"]]
                              for i in range(N)], preload=("stages.generate", "replay.engines.hf_engine"))
    for root in (single, sharded):
        import_known_completions(root, tmp)
    for r in (0, 1):
        invoke("score", "--store", single, "--round", r, "--workers", 1)
    score_output = run_workers([
        [["score", "--store", sharded, "--round", r, "--workers", 1, "--shard", f"{i}/{SCORE_N}"] for r in (0, 1)]
        for i in range(SCORE_N)])
    return Store.open(single), Store.open(sharded), score_output


def manifests(store, round, stage, n=N):
    return [store.read_manifest(round, keys.shard_stage(stage, i, n)) for i in range(n)]


def overlap(records):
    """True when every worker's stage was running at one common moment."""
    started = max(datetime.fromisoformat(r["started_at"]) for r in records)
    return started < min(datetime.fromisoformat(r["finished_at"]) for r in records)


def test_shards_split_prompts_exactly_once():
    pids = [keys.prompt_id("arith", f"problem {i}") for i in range(200)]
    owners = [[i for i in range(N) if keys.in_shard(pid, i, N)] for pid in pids]
    assert all(len(o) == 1 for o in owners)
    assert keys.parse_shard("2/3") == (2, 3) and keys.shard_stage("score", 2, 3) == "score.shard-2-of-3"
    assert keys.shard_stage("score", 0, 1) == "score"
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ReplayError, match="--shard"):
            keys.parse_shard(bad)


def test_score_refuses_a_bad_shard_in_one_line(tmp_path):
    result = runner.invoke(app, ["score", "--store", str(tmp_path), "--shard", "3/2"])
    assert result.exit_code == 1 and "--shard 3/2: need 0 <= i < n" in result.output
    assert "Traceback" not in result.output


def test_concurrent_generate_shards_equal_one_run(stores):
    single, sharded, _ = stores
    order = f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE round = 0 ORDER BY prompt_id, sample_idx"
    expected = single.query(order).to_pylist()
    assert len(expected) == 9 * G and sharded.query(order).to_pylist() == expected
    records = manifests(sharded, 0, "generate")
    assert all(r["status"] == "complete" and r["counts"]["prompts"] > 0 for r in records)  # no idle shard
    assert sum(r["counts"]["prompts"] for r in records) == 9 and overlap(records)
    assert stage_status(sharded, 0, "generate") == f"complete ({N} shards)"
    (sharded.root / "manifests" / "round=0" / f"generate.shard-1-of-{N}.json").rename(sharded.root / "aside.json")
    assert stage_status(sharded, 0, "generate") == f"{N - 1}/{N} shards complete"
    (sharded.root / "aside.json").rename(sharded.root / "manifests" / "round=0" / f"generate.shard-1-of-{N}.json")
    prompts = sharded.query("SELECT prompt_id, count(*) AS n FROM prompts GROUP BY 1").to_pylist()
    assert len(prompts) == 9 + len(IMPORTED) and all(p["n"] == 1 for p in prompts)  # each worker: its own
    rerun = invoke(*GENERATE, "--model", records[1]["config"]["model"], "--store", sharded.root, "--shard", f"1/{N}")
    assert f"0 groups written (0 rollouts, 0 tokens), {records[1]['counts']['prompts']} already stored" in rerun


def test_generate_shards_write_disjoint_part_files(stores):
    _, sharded, _ = stores
    rows = sharded.query("SELECT filename, prompt_id, sample_idx FROM read_parquet(?, filename = true)",
                         [str(sharded.table_dir("rollouts", 0) / "part-*.parquet")]).to_pylist()
    shards_per_file = {}
    for row in rows:
        shards_per_file.setdefault(row["filename"], set()).add(keys.shard_of(row["prompt_id"], N))
    assert all(len(s) == 1 for s in shards_per_file.values())  # a part file belongs to one worker
    assert len({s for ss in shards_per_file.values() for s in ss}) == N
    assert len({(r["prompt_id"], r["sample_idx"]) for r in rows}) == len(rows) == 9 * G  # no duplicates


def test_concurrent_score_shards_give_one_verdict_per_rollout_equal_to_one_run(stores):
    single, sharded, score_output = stores
    order = f"SELECT {VERDICT_COLUMNS} FROM verdicts ORDER BY round, prompt_id, sample_idx"
    expected = single.query(order).to_pylist()
    assert sharded.query(order).to_pylist() == expected
    assert len(expected) == sharded.query("SELECT count(*) FROM rollouts").column(0)[0].as_py() == 9 * G + 18
    assert {(v["correct"], v["status"]) for v in expected} >= {(True, "ok"), (False, "ok"), (False, "no_answer")}
    for r, rollouts in ((0, 9 * G), (1, 18)):
        records = manifests(sharded, r, "score", SCORE_N)
        assert all(m["counts"]["scored"] > 0 for m in records)  # no idle shard
        assert sum(m["counts"]["scored"] for m in records) == rollouts
    assert overlap(manifests(sharded, 0, "score", SCORE_N))  # both began round 0 at once
    assert score_output.count("torch imported: False") == SCORE_N, score_output
    # the shard that finished last left each round a current group summary, and the views read it
    assert sorted(summary.split_rounds(sharded)[0]) == [0, 1]
    groups = "SELECT round, prompt_id, n, n_correct, kind FROM groups ORDER BY ALL"
    assert sharded.query(groups).to_pylist() == single.query(groups).to_pylist()
    # nothing is left for an unsharded score, nor for a shard run again
    assert "scored 0" in invoke("score", "--store", sharded.root, "--round", 0, "--workers", 1,
                                "--shard", f"1/{SCORE_N}")
    assert "scored 0" in invoke("score", "--store", sharded.root, "--round", 1, "--workers", 1)


def test_one_learn_over_the_sharded_round_then_doctor_passes(stores):
    _, sharded, _ = stores
    model = sharded.read_manifest(0, keys.shard_stage("generate", 0, N))["config"]["model"]
    invoke("learn", "--store", sharded.root, "--round", 0, "--objective", "lens", "--model", model,
           "--micro-batch-size", 9, "--grad-accum", 1, "--lr", "1e-3")
    audit = sharded.query("SELECT count(*) AS n, count(DISTINCT prompt_id) AS groups FROM learn_audit").to_pylist()
    assert audit == [{"n": 9 * G, "groups": 9}]  # every shard's groups, once
    assert diagnose(sharded.root).problems == []
    invoke("doctor", "--store", sharded.root)  # exit 0


def test_writers_reap_only_their_own_hosts_dead_temp_files(tmp_path):
    # workers on several machines share a directory: a pid from another host says nothing here
    directory = tmp_path / "part-dir"
    directory.mkdir()
    other_host = "h" + ("0" * 8 if HOST_TAG != "h" + "0" * 8 else "1" * 8)
    mine, legacy = directory / f".tmp-999999999-{HOST_TAG}-x", directory / ".tmp-999999999-part-y"
    theirs = directory / f".tmp-999999999-{other_host}-part-z"
    for path in (mine, legacy, theirs):
        path.write_bytes(b"half")
    assert clean_temp_files(directory) == 2
    assert theirs.exists() and not mine.exists() and not legacy.exists()
