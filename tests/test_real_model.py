"""The issue's acceptance command on the real SmolLM2-135M, for both engines (slow; run by CI).

Stored logprobs must equal a teacher-forced recompute with the training code path
(replay.learn.policy.token_logprobs on the row's own distribution: temperature 0.7, top-k 20,
top-p 0.9, read through the sampling rule as `learn` reads it): <= 2e-3 for transformers, <= 3e-2
for vLLM.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from replay.store import Store

pytestmark = pytest.mark.slow
COMMAND = ["generate", "--round", "0", "--dataset", "arith", "--num-prompts", "8", "--num-samples", "4",
           "--max-new-tokens", "48", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9",
           "--seed", "7"]


def run_cli(store, engine):
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
    cmd = [sys.executable, "-m", "replay", *COMMAND, "--engine", engine, "--store", str(store)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def max_logprob_error(store: Store) -> float:
    from replay.learn.policy import frozen_policy, make_batch, token_logprobs
    from replay.learn.selection import SAMPLING_COLUMNS, row_distribution
    from replay.models import resolve_model

    rows = store.query(f"SELECT prompt_token_ids p, completion_token_ids c, completion_logprobs l, "
                       f"{', '.join(SAMPLING_COLUMNS)} FROM rollouts ORDER BY prompt_id, sample_idx").to_pylist()
    assert all(abs(r["temperature"] - 0.7) < 1e-6 and r["top_k"] == 20 and abs(r["top_p"] - 0.9) < 1e-6 for r in rows)
    model = frozen_policy(resolve_model("smollm2-135m"), None, device="cpu", dtype="float32")
    worst = 0.0
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        batch = make_batch([r["p"] for r in chunk], [r["c"] for r in chunk], [row_distribution(r, recompute=False) for r in chunk])
        with torch.no_grad():
            recomputed = token_logprobs(model, batch)
        for i, r in enumerate(chunk):
            diff = (recomputed[i, : len(r["c"])] - torch.tensor(r["l"])).abs().max().item()
            worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("engine, tolerance", [
    ("transformers", 2e-3),
    pytest.param("vllm", 3e-2, marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                         reason="vllm not installed")),
])
def test_generate_acceptance_command(tmp_path, engine, tolerance):
    out = run_cli(tmp_path / "store", engine)
    assert "8 groups written (32 rollouts" in out
    store = Store.open(tmp_path / "store")
    sizes = store.query("SELECT count(*) AS n FROM rollouts GROUP BY prompt_id").column("n").to_pylist()
    assert sizes == [4] * 8
    mode = store.query("SELECT DISTINCT engine, logprobs_mode FROM rollouts").to_pylist()
    assert mode == [{"engine": engine, "logprobs_mode": "processed"}]
    assert max_logprob_error(store) <= tolerance
    assert "0 groups written" in run_cli(tmp_path / "store", engine)  # a rerun adds nothing
