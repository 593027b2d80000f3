"""`torchrun --nproc_per_node 2 -m replay learn` (gloo, CPU) on a real store equals one process with
the same global batch: the same adapter (within 1e-5), the same learn_metrics rows, one writer,
no hang when a step's micro-batches do not divide among the ranks."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from replay.learn.distributed import rank_share_of, torchrun_argv
from replay.store import Store
from tests._cli import invoke_ok
from tests._tiny_model import save_tiny_model

# 16 samples, micro 6, 2 ranks x accumulation 2 = 1 rank x 4: one step of [6, 6, 4] per epoch, so
# rank 0 makes two passes (the first under no_sync) and rank 1 one real pass and one zero-weight pass.
# lr 1e-3: AdamW moves each weight by about ±lr per step whatever its gradient's scale, so a rank
# that drops or doubles a micro-batch shows as ~1e-3, while the summation order's float rounding,
# amplified where a gradient element is near AdamW's eps, stays ~1e-6 (it reached 1.2e-5 at lr 1e-2)
COMMON = ["--round", "0", "--objective", "grpo", "--lr", "1e-3", "--micro-batch-size", "6", "--epochs", "2",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    root = tmp_path_factory.mktemp("ddp") / "store"
    invoke_ok("generate", "--store", root, "--round", 0, "--num-prompts", 4, "-G", 4, "--max-new-tokens", 6,
              "--engine", "transformers", "--model", model_dir, "--seed", 5, "--levels", "1",
              "--temperature", 0.9, "--top-k", 8)
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    store = Store.open(root)
    # a known mix of outcomes so GRPO trains on every sample (no all-equal group)
    import datetime as dt

    from tests._store_rows import verdict_row

    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    pids = sorted(store.query("SELECT DISTINCT prompt_id FROM rollouts").column(0).to_pylist())
    store.write("verdicts", [verdict_row(0, pid, i, (i + j) % 2 == 0, scored_at=later, version="hand")
                             for j, pid in enumerate(pids) for i in range(4)], round=0)
    return store


def run(args, timeout=600):
    env = dict(os.environ, REPLAY_TORCH_THREADS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


def adapter(store, name):
    return load_file(str(store.adapter_dir(0, name) / "adapter_model.safetensors"))


def metrics(store, name):
    return store.query("SELECT * EXCLUDE (seconds, adapter_name) FROM learn_metrics WHERE adapter_name = ? "
                       "ORDER BY step", [name]).to_pylist()


def test_two_ranks_equal_one_process_with_the_same_global_batch(store):
    run([sys.executable, "-m", "replay", "learn", "--store", str(store.root), "--adapter-name", "one",
         "--grad-accum", "4", *COMMON])
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "replay", "learn", "--store", str(store.root), "--adapter-name", "two", "--grad-accum", "2",
               *COMMON])
    assert out.count("grpo on 16 samples") == 1  # rank 0 alone reports
    one, two = adapter(store, "one"), adapter(store, "two")
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)  # it trained
    rows_one, rows_two = metrics(store, "one"), metrics(store, "two")
    assert len(rows_one) == len(rows_two) == 2  # 2 epochs x 1 step
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys()
        for key in a:  # numbers within rounding, every other column (objective, ...) equal
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
            else:
                assert b[key] == a[key], key
    # one writer: one audit row per sample, one metrics row per step, one manifest
    audit = store.query("SELECT count(*) AS n FROM learn_audit WHERE adapter_name = 'two'").to_pylist()
    assert audit == [{"n": 16}]
    assert store.read_manifest(0, "learn.two")["config"]["world_size"] == 2
    # --nproc 2 is the same run, exec'd under torchrun; a rerun is a no-op
    run([sys.executable, "-m", "replay", "learn", "--store", str(store.root), "--adapter-name", "three",
         "--grad-accum", "2", "--nproc", "2", *COMMON])
    for key in one:
        torch.testing.assert_close(adapter(store, "three")[key], one[key], atol=1e-5, rtol=0)
    assert "already complete" in run([sys.executable, "-m", "replay", "learn", "--store", str(store.root),
                                      "--adapter-name", "three", "--nproc", "2", *COMMON])
    assert "error" not in run([sys.executable, "-m", "replay", "doctor", "--store", str(store.root)]).lower()


def test_steps_under_two_ranks_equal_one_process(store):
    """learn --steps 3: the same plan on every rank (16 samples -> steps of 6, 5, 5, micro-batches of 2:
    passes [2, 2, 2] and [2, 2, 1], so rank 1 pads one step), --grad-accum unused either way."""
    steps = ["--round", "0", "--objective", "grpo", "--lr", "1e-3", "--micro-batch-size", "2", "--epochs", "1",
             "--device", "cpu", "--steps", "3"]
    run([sys.executable, "-m", "replay", "learn", "--store", str(store.root), "--adapter-name", "steps-one",
         "--grad-accum", "5", *steps])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "replay",
         "learn", "--store", str(store.root), "--adapter-name", "steps-two", *steps])
    one, two = adapter(store, "steps-one"), adapter(store, "steps-two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    rows_one, rows_two = metrics(store, "steps-one"), metrics(store, "steps-two")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [0, 1, 2]
    for a, b in zip(rows_one, rows_two):
        assert b["tokens"] == a["tokens"] and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_rank_share_pads_with_empty_passes():
    steps = [[1, 2], [3, 4], [5]]
    assert rank_share_of(steps, 0, 2) == [[1, 2], [5]]
    assert rank_share_of(steps, 1, 2) == [[3, 4], []]
    assert rank_share_of([[1]], 2, 3) == [[]]


def test_nproc_becomes_a_torchrun_command():
    argv = torchrun_argv(4, ["learn", "--store", "s", "--nproc", "4", "--lr", "1e-5", "--nproc=4"])
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "replay",
                        "learn", "--store", "s", "--lr", "1e-5"]
