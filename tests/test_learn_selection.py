"""What `learn` selects and refuses: `--where` runs as data on the confined connection (the
injection of issue 16 writes nothing), rows with a sampling setting the learner cannot reproduce
are refused before anything is written, rows without prompt token ids are named."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from replay.errors import ReplayError
from replay.learn.config import LearnConfig
from replay.learn.loop import train
from replay.learn.selection import load_samples
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._store_rows import prompt_row, rollout_row, verdict_row
from tests._tiny_model import save_tiny_model

INJECTION = ("(SELECT $$a$$lo WHERE 'z' <> $$) IS NOT NULL)) SELECT 1; COPY (SELECT content FROM "
             "read_text('/etc/passwd')) TO 'pwn.csv'; SELECT 1 FROM (SELECT 1 AS round, 1 AS prompt_id) in_window, "
             "(SELECT 1 AS x) t WHERE ((1 = 1 OR 'q' = $$) IS NOT NULL -- $$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def generated_store(root: Path, model_dir, *extra) -> Store:
    invoke_ok("generate", "--store", root, "--round", 0, "--num-prompts", 4, "-G", 4, "--max-new-tokens", 6,
              "--engine", "transformers", "--model", model_dir, "--seed", 3, "--levels", "1", *extra)
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1)
    return Store.open(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir):
    return generated_store(tmp_path_factory.mktemp("sel") / "store", model_dir)


def keys(samples):
    return [(s.round, s.prompt_id, s.sample_idx) for s in samples]


def expected_keys(store, predicate_sql):
    """The old selection, spelled out by hand: whole scored groups with a sample matching."""
    return [tuple(r.values()) for r in store.query(
        "SELECT round, prompt_id, sample_idx FROM samples WHERE (round, prompt_id) IN "
        f"(SELECT round, prompt_id FROM samples WHERE {predicate_sql}) ORDER BY ALL").to_pylist()]


def test_a_normal_where_selects_the_same_groups_as_before(store, model_dir):
    from replay.models import resolve_model

    ref = resolve_model(str(model_dir))
    stop, _ = load_samples(store, LearnConfig(where="finish_reason = 'stop'"), ref)
    assert keys(stop) == expected_keys(store, "finish_reason = 'stop'")
    length, _ = load_samples(store, LearnConfig(where="finish_reason = 'length'"), ref)
    assert keys(length) == expected_keys(store, "finish_reason = 'length'")
    assert 0 < len(stop) < 16  # the filter did something
    every, _ = load_samples(store, LearnConfig(), ref)
    assert len(every) == 16


def test_the_injection_of_issue_16_runs_as_one_expression_and_writes_nothing(store, model_dir, tmp_path,
                                                                             monkeypatch):
    """The predicate parses as ONE expression whose COPY sits inside a $$ string: it is a constant,
    never statement text, so nothing it spells out runs."""
    monkeypatch.chdir(tmp_path)
    from replay.models import resolve_model

    samples, _ = load_samples(store, LearnConfig(where=INJECTION), resolve_model(str(model_dir)))
    assert len(samples) == 16
    result = invoke("learn", "--store", store.root, "--adapter-name", "inj", "--where", INJECTION, "--lr", "0")
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.rglob("pwn.csv")) and not list(Path(store.root).rglob("pwn.csv"))


@pytest.mark.parametrize("where,message", [
    ("1=1; COPY (SELECT 1) TO 'pwn2.csv'", "not one SQL expression"),
    ("true) OR (true", "not one SQL expression"),
    ("(SELECT count(*) FROM read_text('/etc/passwd')) > 0", "failed"),
    ("round = $lo", "failed"),
    ("no_such_column = 1", "failed"),
])
def test_bad_or_escaping_predicates_are_refused_before_anything_is_written(store, tmp_path, monkeypatch,
                                                                            where, message):
    monkeypatch.chdir(tmp_path)
    result = invoke("learn", "--store", store.root, "--adapter-name", "bad", "--where", where)
    assert result.exit_code == 1 and message in result.output and "--where" in result.output, result.output
    assert not list(tmp_path.rglob("pwn2.csv")) and not list(Path(store.root).rglob("pwn2.csv"))
    assert not store.adapter_dir(0, "bad").exists() and store.read_manifest(0, "learn.bad") is None


def test_greedy_rows_are_refused_and_nothing_is_written(tmp_path, model_dir):
    store = generated_store(tmp_path / "greedy", model_dir, "--temperature", 0)
    result = invoke("learn", "--store", store.root)
    assert result.exit_code == 1
    assert "temperature=0.0" in result.output and "--recompute-old-logprobs" in result.output, result.output
    assert not store.adapter_dir(0).exists() and store.read_manifest(0, "learn") is None
    assert not store.files("learn_audit") and not store.files("learn_metrics")
    # recomputed, both sides use the learner's plain softmax: the ratio is exact again
    assert "on 16 samples" in invoke_ok("learn", "--store", store.root, "--recompute-old-logprobs")
    assert store.read_manifest(0, "learn")["old_logprobs"] == "recomputed"


def hand_store(root, **rollout_changes) -> Store:
    store = Store.create(root, base_model="test-model")
    prompt = prompt_row("p0")
    store.write("prompts", [prompt])
    rows = [rollout_row(0, prompt["prompt_id"], i) | rollout_changes for i in range(2)]
    store.write("rollouts", rows, round=0)
    store.write("verdicts", [verdict_row(0, prompt["prompt_id"], i, i == 0) for i in range(2)], round=0)
    return store


def test_an_unknown_logprobs_mode_and_a_recorded_setting_on_an_import_are_refused(tmp_path):
    store = hand_store(tmp_path / "a", logprobs_mode="processed_logits")
    with pytest.raises(ReplayError, match="logprobs_mode='processed_logits'.*--recompute-old-logprobs"):
        load_samples(store, LearnConfig(), None)
    store = hand_store(tmp_path / "b", logprobs_mode="unknown", temperature=0.6)
    with pytest.raises(ReplayError, match="2 selected rollouts.*temperature=0.6"):
        load_samples(store, LearnConfig(), None)
    # an import without sampling settings: the distribution of its logprobs is unknown (issue 24) ...
    store = hand_store(tmp_path / "c", logprobs_mode="unknown", temperature=None, top_p=None, top_k=None)
    with pytest.raises(ReplayError, match="2 selected rollouts carry logprobs of unknown sampling.*"
                                          "--recompute-old-logprobs"):
        load_samples(store, LearnConfig(), None)
    # ... while raw logprobs (import --logprobs-mode raw) are the plain softmax's, however they were sampled
    store = hand_store(tmp_path / "d", logprobs_mode="raw", temperature=None, top_p=None, top_k=None)
    samples, _ = load_samples(store, LearnConfig(), None)
    assert {s.distribution.temperature for s in samples} == {1.0}


def test_rows_without_prompt_token_ids_are_named_not_crashed_on(tmp_path):
    store = hand_store(tmp_path / "a", prompt_token_ids=None, logprobs_mode="unknown", temperature=None)
    with pytest.raises(ReplayError, match="no prompt token ids.*round 0 prompt .* sample 0"):
        load_samples(store, LearnConfig(), None)
    # and the loop itself names such a row if one reaches it
    sample = SimpleNamespace(prompt_ids=None, completion_ids=[1, 2], name="round 0 prompt p sample 3")
    advantages = SimpleNamespace(advantage=torch.tensor([1.0]), weight=torch.tensor([1.0]))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ReplayError, match="round 0 prompt p sample 3 has no prompt token ids"):
        train(model, [sample], advantages, LearnConfig())
