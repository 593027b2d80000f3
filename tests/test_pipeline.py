"""generate -> score -> learn through the CLI on a tiny random model (fast; the real model is in
test_real_model.py). Verdicts are then overridden by a hand-made re-score so that the learn
stage sees known negative, mixed and positive groups."""

import datetime as dt
import math

import pytest
import torch

from replay.cli import app
from replay.store import Store
from tests._cli import invoke_ok as invoke
from tests._cli import runner
from tests._store_rows import verdict_row
from tests._tiny_model import save_tiny_model

G = 4
# per prompt (in prompt_id order): which samples the hand-made re-score calls correct
OUTCOMES = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("pipeline") / "store"
    gen = ("generate", "--store", root, "--round", 0, "--num-prompts", 4, "-G", G, "--max-new-tokens", 6,
           "--engine", "transformers", "--model", model_dir, "--seed", 7, "--levels", "1")
    out = invoke(*gen)
    assert "4 groups written (16 rollouts" in out
    assert "0 groups written" in invoke(*gen)  # a rerun adds nothing
    out = invoke("score", "--store", root, "--round", 0, "--workers", 1)
    assert "scored 16" in out and "already scored" in out
    assert "scored 0" in invoke("score", "--store", root, "--round", 0, "--workers", 1)
    store = Store.open(root)
    # the no-op reruns left the manifests of the runs that did the work
    assert store.read_manifest(0, "generate")["counts"]["groups_written"] == 4
    assert store.read_manifest(0, "score")["counts"]["scored"] == 16
    pids = sorted(store.query("SELECT DISTINCT prompt_id FROM rollouts").column(0).to_pylist())
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    store.write("verdicts", [verdict_row(0, pid, i, bool(OUTCOMES[j][i]), scored_at=later, version="hand")
                             for j, pid in enumerate(pids) for i in range(G)], round=0)
    store.pids = pids
    return store


def test_generated_rows_are_complete_groups(store):
    rows = store.query("SELECT prompt_id, count(*) AS n, bool_and(len(completion_logprobs) = "
                       "len(completion_token_ids)) AS aligned, bool_and(policy_round IS NULL) AS base "
                       "FROM rollouts GROUP BY prompt_id").to_pylist()
    assert len(rows) == 4 and all(r["n"] == G and r["aligned"] and r["base"] for r in rows)
    kinds = store.query("SELECT kind, count(*) AS n FROM groups GROUP BY kind ORDER BY kind").to_pylist()
    assert kinds == [{"kind": "mixed", "n": 2}, {"kind": "negative", "n": 1}, {"kind": "positive", "n": 1}]


def audit(store, name):
    rows = store.query("SELECT * FROM learn_audit WHERE adapter_name = ? ORDER BY prompt_id, sample_idx",
                       [name]).to_pylist()
    return {(r["prompt_id"], r["sample_idx"]): r for r in rows}


def test_lens_audit_follows_the_formula(store, model_dir):
    out = invoke("learn", "--store", store.root, "--round", 0, "--objective", "lens", "--lr", "1e-3")
    assert "16 samples in 4 groups" in out
    rows = audit(store, "main")
    conf = {(r["prompt_id"], r["sample_idx"]): r["confidence"]
            for r in store.query("SELECT prompt_id, sample_idx, confidence FROM samples").to_pylist()}
    negative = store.pids[0]
    c = [conf[(negative, i)] for i in range(G)]
    d = 2 * max(c)
    shaped = [-(1 / G) * ci / (d - ci) for ci in c]
    for i in range(G):
        row = rows[(negative, i)]
        assert row["group_kind"] == "negative" and row["weight"] == 0.25
        assert row["confidence"] == pytest.approx(c[i], rel=1e-6)
        assert row["advantage"] == pytest.approx(shaped[i] - sum(shaped) / G, abs=1e-9)
    assert all(rows[(store.pids[3], i)]["advantage"] == 0 for i in range(G))  # all correct
    # rerun is a no-op; the adapter loads with peft and changes the model
    assert "already complete" in invoke("learn", "--store", store.root, "--round", 0)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(store.adapter_dir(0)))
        after = tuned(ids).logits
    assert not torch.allclose(before, after)
    metrics = store.query("SELECT * FROM learn_metrics WHERE adapter_name = 'main'").to_pylist()
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # stored logprobs = training logprobs


@pytest.mark.parametrize("objective, wrong, right", [("nsr", -1.0, 0.0), ("psr", 0.0, 1.0),
                                                     ("w_reinforce", -1.0, 0.1)])
def test_reinforce_family_audit(store, objective, wrong, right):
    invoke("learn", "--store", store.root, "--round", 0, "--objective", objective, "--adapter-name", objective)
    correct = {(r["prompt_id"], r["sample_idx"]): r["correct"]
               for r in store.query("SELECT prompt_id, sample_idx, correct FROM samples").to_pylist()}
    for key, row in audit(store, objective).items():
        assert row["advantage"] == pytest.approx(right if correct[key] else wrong)
    assert store.adapter_dir(0, objective).joinpath("adapter_config.json").exists()


def test_grpo_audit_and_where_filter(store):
    invoke("learn", "--store", store.root, "--round", 0, "--objective", "grpo", "--adapter-name", "grpo",
           "--where", "prompt_id <> 'none'")
    rows = audit(store, "grpo")
    mixed = [rows[(store.pids[2], i)]["advantage"] for i in range(G)]
    r = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    expected = (r - r.mean()) / (r.std() + 1e-6)
    assert mixed == pytest.approx(expected.tolist(), abs=1e-9)
    assert all(rows[(store.pids[0], i)]["advantage"] == 0 for i in range(G))
    bad = runner.invoke(app, ["learn", "--store", str(store.root), "--objective", "grpo", "--adapter-name",
                              "x", "--where", "1=1; DROP VIEW samples"])
    assert bad.exit_code == 1 and bad.output.startswith("error:")


def test_nsr_lowers_the_logprob_of_wrong_samples(store, model_dir):
    """A few NSR steps must make the wrong samples less likely under the trained policy."""
    invoke("learn", "--store", store.root, "--round", 0, "--objective", "nsr", "--adapter-name", "nsr-big",
           "--lr", "5e-3", "--epochs", "3", "--grad-accum", "1", "--fresh")
    from replay.core.sampling import Distribution
    from replay.learn.policy import frozen_policy, make_batch, token_logprobs
    from replay.models import resolve_model

    rows = store.query("SELECT s.correct, r.prompt_token_ids p, r.completion_token_ids c, r.temperature t "
                       "FROM samples s JOIN rollouts r USING (round, prompt_id, sample_idx) "
                       "WHERE NOT s.correct").to_pylist()
    batch = make_batch([r["p"] for r in rows], [r["c"] for r in rows], [Distribution(r["t"]) for r in rows])

    def total(adapter):
        with torch.no_grad():
            return float((token_logprobs(frozen_policy(resolve_model(str(model_dir)), adapter), batch) * batch.target_mask).sum())

    assert total(store.adapter_dir(0, "nsr-big")) < total(None) - 0.1


def test_eval_base_and_adapter_give_passk_tables(store):
    common = ("--store", store.root, "--num-prompts", 3, "--num-samples", 4, "--max-new-tokens", 4,
              "--levels", "1", "--engine", "transformers", "--workers", 1)
    out = invoke("eval", "--base", *common)
    assert "pass@k" in out and "all=all" not in out and "level=1" in out
    assert any(line.split("│")[1].strip() == "all" for line in out.splitlines() if line.count("│") > 2)
    invoke("eval", "--round", 0, *common)
    rows = store.query("SELECT round, adapter_name, group_by, k, pass_at_k, n_prompts FROM eval_passk "
                       "WHERE group_by = 'all' ORDER BY round, k").to_pylist()
    assert [(r["round"], r["adapter_name"], r["k"]) for r in rows] == [
        (-1, "base", 1), (-1, "base", 2), (-1, "base", 4), (0, "main", 1), (0, "main", 2), (0, "main", 4)]
    # pass@k from the eval store's own groups, computed by hand
    from replay.store import Store

    sub = Store.open(store.root / "evals/base")
    groups = sub.query("SELECT n, n_correct FROM groups").to_pylist()
    assert len(groups) == 3
    p1 = sum(g["n_correct"] / g["n"] for g in groups) / 3
    assert rows[0]["pass_at_k"] == pytest.approx(p1)
    # eval samples never reach the training tables
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 16}]
    missing = runner.invoke(app, ["eval", "--round", "5", *map(str, common)])
    assert missing.exit_code == 1 and "no adapter" in missing.output


def test_export_trl_and_jsonl(store, tmp_path):
    import json

    out = tmp_path / "trl.jsonl"
    assert "wrote 16 rollouts" in invoke("export", "--store", store.root, "--format", "trl", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16
    assert all(len(r["completion_ids"]) == len(r["logprobs"]) and r["prompt_ids"] for r in rows)
    out = tmp_path / "plain.parquet"
    invoke("export", "--store", store.root, "--format", "trl", "--out", out, "--round", 0)  # jsonl: *.jsonl only
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 16
