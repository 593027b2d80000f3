"""A stage that already runs on a round makes a second copy exit with a clear message, so two copies
at once never duplicate rows; a holder killed with -9 leaves no stale lock; `replay doctor` stays clean."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from replay.read.doctor import diagnose
from replay.locks import stage_lock
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model
from tests.test_shards import LAUNCHER

GENERATE = ["generate", "--round", 0, "--num-prompts", 6, "-G", 4, "--max-new-tokens", 4, "--engine",
            "transformers", "--levels", "1", "--seed", 3, "--batch-size", 1]
ENV = dict(os.environ, REPLAY_TORCH_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")


def write_import_file(path, prompts=40, samples=4):
    path.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "answer": str(a + 1),
                                        "completion": f"\\boxed{{{a + (i % 2)}}}"}) + "\n"
                            for a in range(prompts) for i in range(samples)))
    return path


BUSY = "another process is writing that round"


def at_once(*commands, preload=("stages.score",)):
    """Run each CLI command in its own forked process, all at once; their output (a refused copy
    prints its one-line error; the launcher only fails on a traceback)."""
    workers = [[[str(a) for a in command]] for command in commands]
    result = subprocess.run([sys.executable, "-c", LAUNCHER, ",".join(preload), json.dumps(workers)],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    return result.stdout + result.stderr


def key_counts(store):
    return store.query("SELECT (SELECT count(*) FROM rollouts) AS rollouts, (SELECT count(DISTINCT "
                       "(round, prompt_id, sample_idx)) FROM rollouts) AS rollout_keys, (SELECT count(*) FROM "
                       "verdicts) AS verdicts, (SELECT count(*) FROM prompts) AS prompts").to_pylist()[0]


@pytest.fixture()
def imported(tmp_path):
    root = tmp_path / "store"
    invoke_ok("import", write_import_file(tmp_path / "rows.jsonl"), "--store", root, "--round", 0)
    return Store.open(root), tmp_path


@pytest.mark.parametrize("stage,table,command", [
    ("generate", "rollouts", ["import", "{file}", "--round", 0]),
    ("import", "rollouts", ["generate", "--round", 0, "--num-prompts", 2]),
    ("score", "verdicts", ["score", "--round", 0, "--workers", 1]),
    ("learn", "learn.main", ["learn", "--round", 0]),
])
def test_a_second_copy_exits_with_a_clear_message_and_writes_nothing(imported, stage, table, command):
    store, tmp_path = imported
    other = write_import_file(tmp_path / "other.jsonl", prompts=3)
    files = sorted(p for p in store.root.rglob("*") if ".locks" not in p.parts)
    with stage_lock(store.root, 0, table, stage):
        result = invoke(*[str(a).format(file=other) for a in command], "--store", store.root)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: cannot run {command[0]} on round 0: another process is writing "
                                    f"that round ({stage}, pid {os.getpid()} on ")
    assert "rerun" in result.output and "Traceback" not in result.output
    assert sorted(p for p in store.root.rglob("*") if ".locks" not in p.parts) == files


def test_other_rounds_and_other_tables_are_not_blocked(imported):
    store, tmp_path = imported
    with stage_lock(store.root, 0, "verdicts", "score"):
        invoke_ok("import", write_import_file(tmp_path / "r1.jsonl", prompts=2), "--store", store.root, "--round", 1)
    with stage_lock(store.root, 0, "rollouts", "generate"):
        invoke_ok("score", "--store", store.root, "--round", 1, "--workers", 1)


def test_shards_lock_themselves_and_exclude_an_unsharded_run(imported):
    store, _ = imported
    with stage_lock(store.root, 0, "verdicts", "score", shard=(0, 2)):
        twin = invoke("score", "--store", store.root, "--round", 0, "--workers", 1, "--shard", "0/2")
        assert twin.exit_code == 1 and "(score --shard 0/2, pid" in twin.output
        whole = invoke("score", "--store", store.root, "--round", 0, "--workers", 1)
        assert whole.exit_code == 1 and "another process is writing that round" in whole.output
        invoke_ok("score", "--store", store.root, "--round", 0, "--workers", 1, "--shard", "1/2")
    with stage_lock(store.root, 0, "verdicts", "score"):
        shard = invoke("score", "--store", store.root, "--round", 0, "--workers", 1, "--shard", "0/2")
        assert shard.exit_code == 1 and "(score, pid" in shard.output


def test_a_holder_killed_with_sigkill_leaves_no_stale_lock(imported):
    store, _ = imported
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from replay.locks import stage_lock
        with stage_lock({str(store.root)!r}, 0, "verdicts", "score"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert invoke("score", "--store", store.root, "--round", 0, "--workers", 1).exit_code == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    invoke_ok("score", "--store", store.root, "--round", 0, "--workers", 1)
    assert diagnose(store.root).errors == []


def test_refused_generate_on_a_new_path_leaves_nothing_behind(tmp_path):
    target = tmp_path / "never-made"
    result = invoke("generate", "--store", target, "--num-samples", 0)
    assert result.exit_code == 1 and not target.exists()


def test_two_imports_and_two_scores_at_once_store_each_row_once(tmp_path):
    # the reproduction: two copies of one stage on one round at once, same arguments
    rows = write_import_file(tmp_path / "rows.jsonl", prompts=300)
    root = tmp_path / "store"
    output = at_once(*[["import", rows, "--store", root, "--round", 0]] * 2)
    assert output.count("imported 1200 rollouts") == 1, output  # the other was refused, or found all stored
    output = at_once(*[["score", "--store", root, "--round", 0, "--workers", 1]] * 2)
    assert output.count("scored 1200") == 1, output  # the other was refused, or found nothing left
    store = Store.open(root)
    assert key_counts(store) == {"rollouts": 1200, "rollout_keys": 1200, "verdicts": 1200, "prompts": 300}
    assert diagnose(root).errors == []


def test_two_generates_at_once_store_each_group_once(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    root = tmp_path / "store"
    output = at_once(*[[*GENERATE, "--model", model, "--store", root]] * 2,
                     preload=("stages.generate", "replay.engines.hf_engine"))
    assert output.count("6 groups written") == 1, output
    assert output.count(BUSY + " (generate, pid") + output.count("0 groups written") == 1, output
    store = Store.open(root)
    assert key_counts(store) == {"rollouts": 24, "rollout_keys": 24, "verdicts": 0, "prompts": 6}
    assert "0 groups written" in invoke_ok(*GENERATE, "--model", model, "--store", root)  # not stuck
    assert diagnose(root).errors == []


KILL_AT_MANIFEST = textwrap.dedent("""
    import os, signal, sys
    import replay.store
    real_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # the manifest is written, not yet renamed into place
        real_replace(src, dst)
    replay.store.os.replace = replace
    from replay.cli import app
    app(sys.argv[2:])
""")


@pytest.mark.parametrize("stage,command", [("score", ["score", "--round", 0, "--workers", 1]),
                                           ("import", ["import", "{file}", "--round", 0])])
def test_a_kill_during_the_manifest_write_is_finished_by_the_rerun(tmp_path, stage, command):
    rows = write_import_file(tmp_path / "rows.jsonl", prompts=5)
    root = tmp_path / "store"
    if stage == "score":
        invoke_ok("import", rows, "--store", root, "--round", 0)
    args = [str(a).format(file=rows) for a in command] + ["--store", str(root)]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_MANIFEST, f"{stage}.json", *args], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifests = root / "manifests" / "round=0"
    assert not (manifests / f"{stage}.json").exists() and list(manifests.glob(f".tmp-*-{stage}.json"))
    invoke_ok(*args)  # nothing left to do
    record = Store.open(root).read_manifest(0, stage)
    worked = record["counts"]["scored" if stage == "score" else "rollouts_written"]
    assert record["status"] == "complete" and worked == 20  # the account of the run that did the work
    assert not list(manifests.glob(".tmp-*"))
    assert diagnose(root).problems == []


def test_a_half_written_temp_manifest_is_removed_by_the_rerun(imported):
    store, _ = imported
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from replay.store import HOST_TAG
    half = store.manifest_path(0, "import").parent / f".tmp-{dead.stdout.strip()}-{HOST_TAG}-abc-import.json"
    half.write_text('{"stage": "import", "status": "compl')
    before = store.read_manifest(0, "import")
    store.manifest_path(0, "import").unlink()
    invoke_ok("import", before["config"]["file"], "--store", store.root,
              "--round", 0)
    assert not half.exists()
    assert store.read_manifest(0, "import")["counts"]["groups_already_stored"] == 40
