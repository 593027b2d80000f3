"""Step-matched baselines: `--zero-advantage keep` leaves zero-advantage rows in the step plan and in
each step's normaliser (loss 0), and each step logs the share of Σ|w·A| per group kind."""

import json
from types import SimpleNamespace

import pytest
import torch

from replay.core.advantages import KIND_MIXED, KIND_NEGATIVE, KIND_POSITIVE, kind_shares
from replay.learn.config import LearnConfig
from replay.learn.loop import train
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model, tiny_model
from tests.test_learn_ratio import _policy, engine_samples
from tests._store_rows import import_row


def test_kind_shares_worked_by_hand():
    # |w·A|: negative 0.25·0.4 + 0.25·0.4 = 0.2, mixed 1.0 + 0.6 = 1.6, positive 0 -> 0.2/1.8, 1.6/1.8
    adv = torch.tensor([0.4, -0.4, 1.0, -0.6, 0.0])
    weight = torch.tensor([0.25, 0.25, 1.0, 1.0, 1.0])
    kind = torch.tensor([KIND_NEGATIVE, KIND_NEGATIVE, KIND_MIXED, KIND_MIXED, KIND_POSITIVE])
    assert kind_shares(adv, weight, kind) == pytest.approx({"negative": 0.2 / 1.8, "mixed": 1.6 / 1.8,
                                                             "positive": 0.0})
    # per token (token-mean): the negative rows carry 10 tokens each, the mixed ones 1
    shares = kind_shares(adv, weight, kind, torch.tensor([10, 10, 1, 1, 1]))
    assert shares == pytest.approx({"negative": 2.0 / 3.6, "mixed": 1.6 / 3.6, "positive": 0.0})
    assert kind_shares(torch.zeros(2), torch.ones(2), torch.tensor([0, 1])) == {"negative": 0.0, "mixed": 0.0,
                                                                                "positive": 0.0}


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_kept_rows_count_in_the_normaliser_and_nothing_else(aggregation):
    # one step over 6 samples, 2 of them with advantage 0: keep divides the same summed loss by all 6
    # (or by all their tokens), skip by the 4 computed, so the gradients differ by exactly that ratio
    norms, plans = {}, {}
    for mode in ("skip", "keep"):
        torch.manual_seed(0)
        policy = _policy(tiny_model(), init_lora_weights=False)
        samples = engine_samples(policy, 1.0, 0, 1.0, n=6)
        adv = SimpleNamespace(advantage=torch.tensor([1.0, -1.0, 0.0, 0.5, 0.0, -0.5], dtype=torch.float64),
                              weight=torch.ones(6, dtype=torch.float64),
                              kind=torch.tensor([KIND_MIXED] * 2 + [KIND_NEGATIVE] + [KIND_MIXED] * 3))
        cfg = LearnConfig(lr=1e-3, micro_batch_size=2, grad_accum=3, max_grad_norm=1e9, aggregation=aggregation,
                          zero_advantage=mode)
        rows, summary = train(policy, samples, adv, cfg)
        norms[mode], plans[mode] = rows[0]["grad_norm"], summary
    kept = [len(s.completion_ids) for s in samples]
    computed = [n for i, n in enumerate(kept) if i not in (2, 4)]
    ratio = len(computed) / len(kept) if aggregation != "token-mean" else sum(computed) / sum(kept)
    assert norms["keep"] == pytest.approx(norms["skip"] * ratio, rel=1e-4)
    assert plans["skip"]["planned_samples"] == 4 and plans["keep"]["planned_samples"] == 6
    assert plans["keep"]["trained_samples"] == plans["skip"]["trained_samples"] == 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """8 groups of 4: 5 negative (every answer wrong), 3 mixed; token ids in the tiny vocabulary."""
    tmp = tmp_path_factory.mktemp("zero-adv")
    model = save_tiny_model(tmp / "tiny")
    rows = []
    for a in range(8):
        texts = ["\\boxed{99}"] * 4 if a < 5 else [f"\\boxed{{{a}}}", "\\boxed{99}", "\\boxed{98}", "no"]
        rows += [import_row(f"w{a} w{a + 1}", str(a), text, i) for i, text in enumerate(texts)]
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp / "store"
    invoke_ok("import", path, "--store", root, "--tokenizer", model, "--temperature", 1)  # logprobs at T = 1
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    return Store.open(root), model


def learn(store, model, name, objective, *extra):
    invoke_ok("learn", "--store", store.root, "--round", 0, "--model", model, "--adapter-name", name,
              "--objective", objective, "--micro-batch-size", 2, "--grad-accum", 2, "--lr", "1e-3", *extra)
    return store.query("SELECT step, grad_share_negative AS neg, grad_share_mixed AS mixed, grad_share_positive AS pos "
                       "FROM learn_metrics WHERE adapter_name = ? ORDER BY step", [name]).to_pylist()


def test_keep_gives_grpo_the_steps_of_lens_on_a_store_with_negative_groups(store):
    store, model = store
    lens = learn(store, model, "lens", "lens", "--zero-advantage", "keep")
    grpo_keep = learn(store, model, "grpo-keep", "grpo", "--zero-advantage", "keep")
    grpo_skip = learn(store, model, "grpo-skip", "grpo")
    lens_no_negative = learn(store, model, "lens-a0", "lens", "--zero-advantage", "keep", "--lens-alpha", 0)
    assert len(lens) == len(grpo_keep) == len(lens_no_negative) == 8  # 32 samples in steps of 4
    assert len(grpo_skip) == 3  # only the 12 samples of the mixed groups
    assert all(r["neg"] == 0 for r in grpo_keep + lens_no_negative)  # GRPO and α = 0: no negative mass
    assert any(r["neg"] > 0 for r in lens)
    manifest = store.read_manifest(0, "learn.grpo-keep")
    assert manifest["config"]["zero_advantage"] == "keep" and manifest["metrics"]["planned_samples"] == 32
    assert store.read_manifest(0, "learn.grpo-skip")["config"]["zero_advantage"] == "skip"


def test_the_gradient_share_of_mixed_groups_only_is_all_mixed(store):
    store, model = store
    rows = learn(store, model, "mixed-only", "lens", "--where", "prompt_id IN (SELECT prompt_id FROM groups "
                                                                 "WHERE kind = 'mixed')")
    assert rows and all(r["mixed"] == pytest.approx(1.0) and r["neg"] == 0 and r["pos"] == 0 for r in rows)


def test_an_unknown_zero_advantage_mode_is_refused(store):
    store, model = store
    result = invoke("learn", "--store", store.root, "--round", 0, "--zero-advantage", "sometimes")
    assert result.exit_code == 1 and "unknown --zero-advantage 'sometimes'" in result.output
