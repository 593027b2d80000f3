"""`replay round` ticks as real subprocesses on a tiny model: the lock, kill -9 at several points
(then the next tick finishes the round with exactly the rows of an uninterrupted run), policy
rounds, eval and export."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from replay.store import Store
from tests._tiny_model import save_tiny_model

CONFIG = """
[generate]
dataset = "arith"
num_prompts = 4
num_samples = 2
max_new_tokens = 6
engine = "transformers"
model = "{model}"
batch_size = 1
seed = 3

[score]
workers = 1
chunk_size = 3

[learn]
objective = "lens"
epochs = 1
micro_batch_size = 2
grad_accum = 1
lr = 1e-3
"""

# Runs the CLI in a subprocess, after patching one function to SIGKILL the process at its n-th call.
DRIVER = textwrap.dedent("""
    import os, signal, sys, importlib
    target, attr, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if target != "none":
        owner = importlib.import_module(target)
        original, calls = getattr(owner, attr), [0]
        def killer(*a, **k):
            result = original(*a, **k)
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(owner, attr, killer)
    from replay.cli import app
    sys.argv = ["replay"] + sys.argv[4:]
    app()
""")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG.format(model=model))
    return path


def tick(store, config, *extra, kill=("none", "x", 0), background=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", DRIVER, *map(str, kill), "round", "--store", str(store), "--config", str(config),
           *extra]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def snapshot(store_path):
    store = Store.open(store_path)
    return {
        "rollouts": store.query("SELECT round, prompt_id, sample_idx, completion_token_ids, completion_logprobs "
                                "FROM rollouts ORDER BY ALL").to_pylist(),
        "verdicts": store.query("SELECT round, prompt_id, sample_idx, correct FROM verdicts ORDER BY ALL").to_pylist(),
        "audit": store.query("SELECT round, prompt_id, sample_idx, advantage FROM learn_audit ORDER BY ALL").to_pylist(),
        "adapters": sorted(p.name for p in (store.root / "adapters").iterdir() if not p.name.startswith(".")),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config):
    store = tmp_path_factory.mktemp("ref") / "store"
    result = tick(store, config)
    assert result.returncode == 0, result.stdout + result.stderr
    return snapshot(store)


def test_uninterrupted_round(reference):
    assert len(reference["rollouts"]) == 8 and len(reference["verdicts"]) == 8
    assert len(reference["audit"]) == 8 and reference["adapters"] == ["round=0"]


def test_two_ticks_at_once_run_one_round_once(tmp_path, config, reference):
    store = tmp_path / "store"
    first, second = tick(store, config, background=True), tick(store, config, background=True)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert sum("another round is running" in out for out in outputs) == 1, outputs
    assert snapshot(store) == reference


@pytest.mark.parametrize("kill", [
    ("stages.generate", "rollout_rows", 2),  # mid-generate: one group stored, the next in hand
    ("stages.score", "verdict_row", 4),  # mid-score: first chunk of 3 written, second in hand
    ("replay.adapters", "save", 1),  # adapter in place, audit/metrics/manifest not yet written
    ("replay.storage.local", "atomic_write_bytes", 2),  # generate + score manifests written (store.json: link)
])
def test_killed_tick_is_finished_by_the_next(tmp_path, config, reference, kill):
    store = tmp_path / "store"
    killed = tick(store, config, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    finished = tick(store, config)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert snapshot(store) == reference
    assert not list(store.rglob(".tmp-*"))


def test_next_round_samples_with_the_previous_adapter(tmp_path, config):
    store = tmp_path / "store"
    result = tick(store, config, "--until", "1")  # a target round, not a count
    assert result.returncode == 0, result.stdout + result.stderr
    assert "finished round(s) 0, 1" in result.stdout
    again = tick(store, config, "--until", "1")
    assert again.returncode == 0 and "nothing to do: round 1 has learned" in again.stdout, again.stdout
    s = Store.open(store)
    rows = s.query("SELECT round, any_value(policy_round) AS p, count(*) AS n, "
                   "any_value(policy_adapter) AS a FROM rollouts GROUP BY round ORDER BY round").to_pylist()
    assert [(r["round"], r["p"], r["n"]) for r in rows] == [(0, None, 8), (1, 0, 8)]
    assert rows[1]["a"].endswith("adapters/round=0")
    manifest = json.loads((store / "adapters/round=1/manifest.json").read_text())
    assert manifest["init_adapter"].endswith("adapters/round=0")  # training continued round 0's adapter
    log = (store / "logs/rounds.log").read_text()
    assert "round 1: learn" in log


def test_until_must_be_a_round(tmp_path, config):
    result = tick(tmp_path / "store", config, "--until", "-1")
    assert result.returncode == 1 and "--until must be a round number" in result.stderr + result.stdout
    assert not (tmp_path / "store").exists()
