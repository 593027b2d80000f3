"""LENS's confidence c is the policy's own p(y|x)^(1/|y|) at T = 1 with nothing cut: rows sampled at
T 0.7 / top-k 5 (whose stored, processed logprobs are inflated) get the same c as if they had been
sampled at T = 1, computed here independently by a teacher-forced forward pass."""

import math

import pytest
from transformers import AutoModelForCausalLM

from replay.engines import SamplingSettings
from replay.store import Store
from tests._cli import invoke_ok
from tests._tiny_model import save_tiny_model, teacher_forced_logprobs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lens-c")
    model = save_tiny_model(tmp / "tiny")
    root = tmp / "store"
    invoke_ok("generate", "--store", root, "--round", 0, "--num-prompts", 3, "-G", 3, "--max-new-tokens", 6,
              "--engine", "transformers", "--model", model, "--temperature", 0.7, "--top-k", 5, "--levels", "1")
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    return Store.open(root), model


def test_lens_confidence_is_the_policys_own_probability(store):
    store, model = store
    invoke_ok("learn", "--store", store.root, "--round", 0, "--objective", "lens", "--model", model, "--lr", "1e-3",
              "--zero-advantage", "keep")
    audit = {(r["prompt_id"], r["sample_idx"]): r["confidence"]
             for r in store.query("SELECT prompt_id, sample_idx, confidence FROM learn_audit").to_pylist()}
    rows = store.query("SELECT prompt_id, sample_idx, prompt_token_ids, completion_token_ids, completion_logprobs "
                       "FROM rollouts").to_pylist()
    base = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    raw = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6)
    differs = 0
    for r in rows:
        if not r["completion_token_ids"]:
            continue
        own = teacher_forced_logprobs(base, r["prompt_token_ids"], r["completion_token_ids"], raw)
        expected = math.exp(sum(own) / len(own))
        assert audit[(r["prompt_id"], r["sample_idx"])] == pytest.approx(expected, rel=1e-4)
        stored = math.exp(sum(r["completion_logprobs"]) / len(r["completion_logprobs"]))
        differs += abs(stored - expected) > 1e-3
    assert differs > len(rows) // 2  # the stored (processed) confidence would have been another number
    assert store.read_manifest(0, "learn")["selection"]["raw_confidence_rows"] == len(rows)
