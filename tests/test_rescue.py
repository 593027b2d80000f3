"""Replay rescue: the rescue_candidates view, the default and user picks, the guard on --rescue-sql,
the exact behaviour weight of a stale row, and `learn --rescue replay` on a hand-built store with
a tiny model (the SmolLM2 end-to-end run is in tests/test_rescue_smollm2.py)."""

import hashlib
import itertools

import pytest
import torch

from replay.core.sampling import RAW, stored_distribution
from replay.errors import ReplayError
from replay.learn.rescue import attach_behaviour, negative_groups, pick_rows, user_pick
from replay.learn.selection import LearnSample
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._store_rows import prompt_row, rollout_row, verdict_row
from tests._tiny_model import save_tiny_model
from tests.test_learn_ratio import TOKENIZER, _policy, engine_samples
from tests._tiny_model import tiny_model

A, B, C, D, E = (prompt_row(f"w{i} w{i + 1}", answer=str(i)) for i in range(5))
ID = {name: p["prompt_id"] for name, p in zip("ABCDE", (A, B, C, D, E))}
PLAN_STAGE = "generate.ps-000000000000-k1"


def _rows(round, name, correct, overrides=None):
    """Rollouts and verdicts of one group: `correct` is one bool per sample."""
    rollouts, verdicts = [], []
    for i, ok in enumerate(correct):
        row = rollout_row(round, ID[name], i, logprobs=(-0.5, -1.0 - 0.1 * i), policy_round=None if round == 0 else 0)
        row.update((overrides or {}).get(i, {}))
        rollouts.append(row)
        verdicts.append(verdict_row(round, ID[name], i, ok))
    return rollouts, verdicts


def build(root):
    """Round 0: A solved twice by its own G and once by a rescue-sampling set (sample 4), B only by an
    import (of raw logprobs), C solved, D solved once by a row of unreproducible sampling, E negative. Round 1: A, B, D
    negative, C mixed, E solved (a later success never rescues an earlier round)."""
    store = Store.create(root)
    store.write("prompts", [A, B, C, D, E])
    groups = [
        _rows(0, "A", [False, False, True, True, True], {3: {"policy_round": 0}}),
        _rows(0, "B", [False, False, False, False, True], {4: {"engine": "import", "logprobs_mode": "raw",
                                                                 "temperature": None, "top_p": None, "top_k": None}}),
        _rows(0, "C", [True, False, False, False]),
        _rows(0, "D", [False, True, False, False], {1: {"logprobs_mode": "unknown", "temperature": 0.7}}),
        _rows(1, "A", [False] * 4), _rows(1, "B", [False] * 4), _rows(1, "C", [True, False, False, False]),
        _rows(1, "D", [False] * 4), _rows(0, "E", [False] * 4), _rows(1, "E", [False, True, False, False]),
    ]
    for round in (0, 1):
        chosen = [g for g in groups if g[0][0]["round"] == round]
        store.write("rollouts", [r for g in chosen for r in g[0]], round=round)
        store.write("verdicts", [v for g in chosen for v in g[1]], round=round)
    store.write_manifest(0, PLAN_STAGE, {"stage": PLAN_STAGE, "round": 0, "status": "complete",
                                         "config": {"num_samples": 1}, "plan": {ID["A"]: 4},
                                         "started_at": "2026-11-01T00:00:00+00:00", "counts": {}, "versions": {},
                                         "finished_at": "2026-11-01T00:00:01+00:00"})
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build(tmp_path_factory.mktemp("rescue") / "store")


def rollout_id(round, name, i):
    from replay import keys

    return keys.rollout_id(round, ID[name], i)


def test_the_view_lists_every_correct_rollout_of_a_negative_groups_prompt(store):
    rows = store.query("SELECT round, prompt_id, rollout_round, sample_idx, policy_round, source, age "
                       "FROM rescue_candidates ORDER BY prompt_id, sample_idx").to_pylist()
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append((r["round"], r["rollout_round"], r["sample_idx"],
                                                         r["policy_round"], r["source"], r["age"]))
    assert by_prompt == {
        ID["A"]: [(1, 0, 2, None, "generate", 1), (1, 0, 3, 0, "generate", 1), (1, 0, 4, None, "rescue_sampling", 1)],
        ID["B"]: [(1, 0, 4, None, "import", 1)],
        ID["D"]: [(1, 0, 1, None, "generate", 1)],
    }  # round 0's negative group E has no earlier success (round 1's does not count); C is mixed


def test_the_default_pick_is_newest_policy_first_then_rollout_id(store):
    groups = [(1, ID["A"]), (1, ID["B"])]
    picked = [(r["prompt_id"], r["sample_idx"]) for r in pick_rows(store, groups, 2, None)]
    a_rest = sorted([2, 4], key=lambda i: rollout_id(0, "A", i))
    assert picked == sorted([(ID["A"], 3), (ID["A"], a_rest[0]), (ID["B"], 4)],
                            key=lambda x: (x[0], 0 if x == (ID["A"], 3) else 1 + a_rest.index(x[1]) if x[0] == ID["A"] else 0))
    assert [r["sample_idx"] for r in pick_rows(store, [(1, ID["A"])], 1, None)] == [3]
    assert len(pick_rows(store, [(1, ID["A"])], 5, None)) == 3
    assert pick_rows(store, [], 2, None) == []
    assert pick_rows(store, [(1, ID["C"])], 2, None) == []  # not negative in the view: nothing to replay


def test_rescue_sql_narrows_the_pick(store):
    sql = "select rollout_id from rescue_candidates where source = 'rescue_sampling'"
    picked = pick_rows(store, [(1, ID["A"]), (1, ID["B"])], 2, sql)
    assert [(r["prompt_id"], r["sample_idx"]) for r in picked] == [(ID["A"], 4)]
    with pytest.raises(ReplayError, match="rollout_id column"):
        user_pick(store, "select prompt_id from rescue_candidates")


PAYLOADS = ["select current_setting('allowed_directories') as rollout_id",
            "select * from duckdb_settings()", "COPY (select 1) TO 'pwn.csv'", "ATTACH ':memory:' AS m",
            "select rollout_id from rescue_candidates; select 1", "create table t as select 1",
            "select * from read_text('/etc/passwd')", "select * from query('select 1')",
            "explain /* analyze select 1 --*/ analyze copy (select 1 as x) to 'pwn.csv'",
            "SHOW allowed_directories"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_rescue_sql_goes_through_the_guard(store, payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree_hash(store.root)
    result = invoke("learn", "--store", store.root, "--round", 1, "--rescue", "replay", "--rescue-sql", payload)
    assert result.exit_code != 0
    assert "root:x:0" not in result.output and "Traceback" not in result.output  # nothing read, one line
    assert not list(tmp_path.iterdir())  # nothing written where we stand
    assert _tree_hash(store.root) == before


def _tree_hash(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_negative_groups_of_the_selection():
    def sample(round, prompt, reward):
        return LearnSample(round, prompt, 0, reward, [1], [2], [-0.1], RAW, None, None)

    samples = [sample(1, "a", 0.0), sample(1, "a", 0.0), sample(1, "b", 0.0), sample(1, "b", 1.0), sample(0, "a", 0.0)]
    assert negative_groups(samples) == [(0, "a"), (1, "a")]


@pytest.mark.parametrize("temperature,top_k,top_p", list(itertools.product([0.7, 1.0], [0, 5], [1.0, 0.8])))
def test_a_row_replayed_under_the_policy_that_sampled_it_has_weight_one(temperature, top_k, top_p):
    """Exact ratio carried over to stale rows: θ_old = μ gives w = 1 for every token, whatever the
    row's T / top-k / top-p; LENS's confidence of the row is θ_old's at T = 1 with nothing cut."""
    torch.manual_seed(0)
    policy = _policy(tiny_model(), init_lora_weights=False)
    rows = engine_samples(policy, temperature, top_k, top_p, n=4)
    replayed = [LearnSample(3, s.prompt_id, s.sample_idx, 1.0, s.prompt_ids, s.completion_ids, None,
                            stored_distribution("processed", temperature, top_k, top_p), None, None,
                            origin="replay", behaviour_round=0, behaviour_logprobs=s.old_logprobs) for s in rows]
    attach_behaviour(replayed, policy, "tis", 2.0, micro_batch_size=3)
    for s in replayed:
        assert max(abs(w - 1.0) for w in s.token_weights) < 1e-4, s.token_weights
        assert abs(s.behaviour_stats["sequence_weight"] - 1.0) < 1e-4 and s.behaviour_stats["age"] == 3
        assert max(abs(a - b) for a, b in zip(s.old_logprobs, s.behaviour_logprobs)) < 1e-4
    raw = attach_raw = [LearnSample(3, s.prompt_id, s.sample_idx, 1.0, s.prompt_ids, s.completion_ids, None, RAW,
                                    None, None, origin="replay", behaviour_round=0,
                                    behaviour_logprobs=s.old_logprobs) for s in rows]
    attach_behaviour(attach_raw, policy, "tis", 2.0, micro_batch_size=3)
    for s, r in zip(replayed, raw):  # c does not depend on the sampling settings of the run that made the row
        assert s.confidence == pytest.approx(r.confidence, rel=1e-6)
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):
        assert any(abs(s.confidence - torch.tensor(s.old_logprobs).mean().exp().item()) > 1e-4 for s in replayed)


# -- learn --rescue replay through the CLI, on the hand-built store with a tiny model ---------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-rescue") / "tiny")


def learn(store, model, name, *extra):
    return invoke("learn", "--store", store.root, "--round", 1, "--model", model, "--adapter-name", name,
                  "--objective", "grpo", "--micro-batch-size", 2, "--grad-accum", 2, "--lr", "1e-3", *extra)


def audit(store, name):
    return store.query("SELECT prompt_id, sample_idx, rollout_round, behaviour_round, origin, advantage, group_kind "
                       "FROM learn_audit WHERE adapter_name = ? ORDER BY origin, prompt_id, sample_idx",
                       [name]).to_pylist()


def test_an_unreproducible_row_is_refused_with_one_line_unless_shaping(tmp_path, tiny):
    store = build(tmp_path / "store")
    result = learn(store, tiny, "refused", "--rescue", "replay")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot replay round 0 prompt {ID['D']} sample 1" in result.output
    assert "logprobs_mode='unknown'" in result.output and "--behaviour-correction shaping" in result.output
    assert not store.adapter_dir(1, "refused").exists()
    shaped = learn(store, tiny, "shaped", "--rescue", "replay", "--behaviour-correction", "shaping")
    assert shaped.exit_code == 0, shaped.output
    replayed = [r for r in audit(store, "shaped") if r["origin"] == "replay"]
    assert sorted((r["prompt_id"], r["sample_idx"]) for r in replayed) == sorted(
        [(ID["A"], 3), (ID["A"], sorted([2, 4], key=lambda i: rollout_id(0, "A", i))[0]), (ID["B"], 4),
         (ID["D"], 1)])


def test_learn_replays_round_0_successes_into_round_1_negative_groups(tmp_path, tiny):
    store = build(tmp_path / "store")
    exclude_d = f"select rollout_id from rescue_candidates where prompt_id <> '{ID['D']}'"
    out = learn(store, tiny, "replay", "--rescue", "replay", "--rescue-sql", exclude_d)
    assert out.exit_code == 0, out.output
    rows = audit(store, "replay")
    replayed = [r for r in rows if r["origin"] == "replay"]
    assert len(replayed) == 3 and {r["prompt_id"] for r in replayed} == {ID["A"], ID["B"]}
    assert all(r["rollout_round"] == 1 and r["behaviour_round"] == 0 and r["advantage"] > 0
               and r["group_kind"] == "mixed" for r in replayed)
    group_rows = [r for r in rows if r["origin"] == "group"]
    assert all(r["behaviour_round"] == r["rollout_round"] == 1 for r in group_rows)
    # A and B are mixed now: their wrong answers get a negative advantage; D stays negative (GRPO: 0)
    assert all(r["advantage"] < 0 for r in group_rows if r["prompt_id"] in (ID["A"], ID["B"]))
    assert all(r["advantage"] == 0 for r in group_rows if r["prompt_id"] == ID["D"])
    metrics = store.query("SELECT sum(replayed_rows) AS n, max(replay_mean_age) AS age, "
                          "max(behaviour_weight_max) AS wmax, max(replay_ess) AS ess FROM learn_metrics "
                          "WHERE adapter_name = 'replay'").to_pylist()[0]
    assert metrics["n"] == 3 and metrics["age"] == 1.0 and metrics["wmax"] > 0 and metrics["ess"] >= 1.0
    manifest = store.read_manifest(1, "learn.replay")
    assert manifest["counts"]["replayed"] == 3
    assert manifest["selection"]["rescue"] | {} == manifest["selection"]["rescue"]
    assert manifest["selection"]["rescue"]["rescued_groups"] == 2
    # a second run adds nothing; a forced one replays the same rows again, without duplicates
    assert "already complete" in learn(store, tiny, "replay", "--rescue", "replay", "--rescue-sql", exclude_d).output
    assert learn(store, tiny, "replay", "--rescue", "replay", "--rescue-sql", exclude_d, "--force").exit_code == 0
    assert audit(store, "replay") == rows


def test_rescue_none_is_todays_learn_bit_for_bit(tmp_path, tiny):
    """Nothing replayed gives the very same adapter bytes as no rescue at all (the same code path)."""
    store = build(tmp_path / "store")
    assert learn(store, tiny, "none").exit_code == 0
    nothing = "select rollout_id from rescue_candidates where false"
    assert learn(store, tiny, "empty", "--rescue", "replay", "--rescue-sql", nothing).exit_code == 0
    with_rows = f"select rollout_id from rescue_candidates where prompt_id <> '{ID['D']}'"
    assert learn(store, tiny, "some", "--rescue", "replay", "--rescue-sql", with_rows).exit_code == 0
    weights = {name: (store.adapter_dir(1, name) / "adapter_model.safetensors").read_bytes()
               for name in ("none", "empty", "some")}
    assert weights["none"] == weights["empty"]
    assert weights["none"] != weights["some"]  # and replayed rows do change it


@pytest.mark.parametrize("flags, message", [
    (["--rescue", "sometimes"], "unknown --rescue 'sometimes'"),
    (["--rescue", "replay", "--behaviour-correction", "clip"], "unknown --behaviour-correction 'clip'"),
    (["--rescue", "replay", "--behaviour-cap", "1"], "--behaviour-cap must be a number above 1"),
    (["--rescue", "replay", "--behaviour-cap", "nan"], "--behaviour-cap must be a number above 1"),
    (["--rescue", "replay", "--rescue-max", "0"], "--rescue-max must be at least 1"),
    (["--rescue", "replay", "--shaping-gamma", "0"], "--shaping-gamma must be a positive number"),
    (["--rescue-sql", "select 1"], "--rescue-sql picks replayed rows: it needs --rescue replay"),
])
def test_bad_rescue_flags_are_one_line(store, flags, message):
    result = invoke("learn", "--store", store.root, "--round", 1, *flags)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_round_takes_the_rescue_settings_from_its_config(tmp_path):
    from replay.cli.settings import load_settings
    from replay.learn.config import LearnConfig

    path = tmp_path / "round.toml"
    path.write_text('[learn]\nrescue = "replay"\nrescue_max = 3\nbehaviour_correction = "seq-mask"\n')
    settings = load_settings(str(path), ["learn.behaviour_cap=3"])
    cfg = LearnConfig(round=1, **settings["learn"])  # as stages.round builds it
    cfg.validate()
    assert (cfg.rescue, cfg.rescue_max, cfg.behaviour_correction, cfg.behaviour_cap) == ("replay", 3, "seq-mask", 3.0)


def test_inspect_rescuable_counts_groups_by_source_and_age(store):
    from replay.read.inspect import inspect_report

    _, rows = inspect_report(store, "rescuable")
    # round 0: E alone is negative, with no earlier success; round 1: A, B, D, all three rescuable
    assert [tuple(r) for r in rows.rows] == [
        (0, 1, "any", "any", 0, 0), (1, 3, "any", "any", 3, 5), (1, 3, "generate", "1", 2, 3), (1, 3, "import", "1", 1, 1),
        (1, 3, "rescue_sampling", "1", 1, 1)]
    assert "rescue_sampling" in invoke_ok("inspect", "rescuable", "--store", store.root, "--round", 1)


def test_inspect_rescue_follows_the_next_rounds_samples(tmp_path, tiny):
    store = build(tmp_path / "store")
    exclude_d = f"select rollout_id from rescue_candidates where prompt_id <> '{ID['D']}'"
    assert learn(store, tiny, "main", "--rescue", "replay", "--rescue-sql", exclude_d).exit_code == 0
    # round 2 (sampled by round 1's adapter): A solved once in 2, B not at all
    rollouts = [rollout_row(2, ID[n], i, policy_round=1) for n in "AB" for i in range(2)]
    store.write("rollouts", rollouts, round=2)
    store.write("verdicts", [verdict_row(2, ID["A"], 0, True), verdict_row(2, ID["A"], 1, False),
                             verdict_row(2, ID["B"], 0, False), verdict_row(2, ID["B"], 1, False)], round=2)
    from replay.read.inspect import inspect_report

    _, rows = inspect_report(store, "rescue")
    got = {r[3]: (r[0], r[2], r[4], r[5], r[6], r[7]) for r in rows.rows}
    assert got == {ID["A"]: (1, 1, 2, 0, 2, 1), ID["B"]: (1, 1, 1, 0, 2, 0)}
    assert ID["A"] in invoke_ok("inspect", "rescue", "--store", store.root)


def test_the_reports_learn_page_plots_the_replayed_rows(tmp_path, tiny):
    store = build(tmp_path / "store")
    exclude_d = f"select rollout_id from rescue_candidates where prompt_id <> '{ID['D']}'"
    assert learn(store, tiny, "main", "--rescue", "replay", "--rescue-sql", exclude_d).exit_code == 0
    invoke_ok("report", "--store", store.root, "--out", tmp_path / "report")
    pngs = sorted(p.name for p in (tmp_path / "report").rglob("*.png"))
    assert any("learn_metrics-replay" in name for name in pngs), pngs


def test_version_and_a_completed_learn_of_another_objective_say_so(tmp_path, tiny):
    assert invoke_ok("--version").startswith("replay 0.")
    store = build(tmp_path / "store")
    assert learn(store, tiny, "main").exit_code == 0  # grpo
    out = invoke("learn", "--store", store.root, "--round", 1, "--model", tiny, "--objective", "lens").output
    assert "already complete" in out and "with objective grpo, not lens" in out and "--adapter-name" in out


def test_a_row_imported_without_sampling_settings_is_refused_too(tmp_path, tiny):
    """'unknown' logprobs with no settings recorded: refused for replay as for a group's own rows,
    unless shaping (which needs no μ)."""
    store = build(tmp_path / "store")
    only_b = f"select rollout_id from rescue_candidates where prompt_id = '{ID['B']}'"
    store.write("rollouts", [rollout_row(0, ID["B"], 5, policy_round=None) | {
        "engine": "import", "logprobs_mode": "unknown", "temperature": None, "top_p": None, "top_k": None}], round=0)
    store.write("verdicts", [verdict_row(0, ID["B"], 5, True)], round=0)
    result = learn(store, tiny, "unknown", "--rescue", "replay", "--rescue-sql", only_b, "--partial")
    assert result.exit_code == 1 and "logprobs_mode='unknown'" in result.output, result.output
    assert learn(store, tiny, "shaped", "--rescue", "replay", "--rescue-sql", only_b, "--partial",
                 "--behaviour-correction", "shaping").exit_code == 0
