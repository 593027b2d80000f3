"""The SQL views on a hand-built store, checked against hand-computed answers."""

import datetime as dt

import pytest

from replay.store import Store
from tests._store_rows import NOW, confidence, prompt_row, rollout_row, verdict_row

# round 0: A all wrong (negative), B 1 of 4 right (mixed), C all right (positive)
# round 1: A 2 of 4 right (rescued), B all wrong (negative), C not sampled
OUTCOMES = {
    0: {"A": [0, 0, 0, 0], "B": [1, 0, 0, 0], "C": [1, 1, 1, 1]},  # B[1] re-scored to 1 below
    1: {"A": [1, 0, 1, 0], "B": [0, 0, 0, 0]},
}
LOGPROBS = [(-0.1, -0.1), (-0.5, -0.3), (-1.0, -2.0), (-0.2,)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = Store.create(tmp_path_factory.mktemp("store"))
    prompts = {name: prompt_row(f"problem {name}", level=i + 1) for i, name in enumerate("ABC")}
    store.write("prompts", list(prompts.values()))
    for round, groups in OUTCOMES.items():
        rollouts, verdicts = [], []
        for name, outcome in groups.items():
            pid = prompts[name]["prompt_id"]
            for idx, correct in enumerate(outcome):
                rollouts.append(rollout_row(round, pid, idx, LOGPROBS[idx], policy_round=round - 1 if round else None))
                verdicts.append(verdict_row(round, pid, idx, bool(correct)))
        store.write("rollouts", rollouts, round=round)
        store.write("verdicts", verdicts, round=round)
    # a re-score under verifier version 2 flips (round 0, B, sample 1) to correct: the newest wins
    later = NOW + dt.timedelta(hours=1)
    store.write("verdicts", [verdict_row(0, prompts["B"]["prompt_id"], 1, True, scored_at=later, version="2")])
    store.prompt_ids = {name: p["prompt_id"] for name, p in prompts.items()}
    return store


def groups_by(store):
    rows = store.query("SELECT round, prompt_id, n, n_correct, pass_rate, kind, mean_confidence FROM groups")
    names = {v: k for k, v in store.prompt_ids.items()}
    return {(r["round"], names[r["prompt_id"]]): r for r in rows.to_pylist()}


def test_group_kinds_and_pass_rates(store):
    groups = groups_by(store)
    assert {k: (g["n"], g["n_correct"], g["kind"]) for k, g in groups.items()} == {
        (0, "A"): (4, 0, "negative"),
        (0, "B"): (4, 2, "mixed"),
        (0, "C"): (4, 4, "positive"),
        (1, "A"): (4, 2, "mixed"),
        (1, "B"): (4, 0, "negative"),
    }
    assert groups[(1, "A")]["pass_rate"] == pytest.approx(0.5)
    expected_conf = sum(confidence(lp) for lp in LOGPROBS) / 4
    assert groups[(0, "A")]["mean_confidence"] == pytest.approx(expected_conf)


def test_samples_take_the_newest_verdict_and_one_row_per_rollout(store):
    rows = store.query("SELECT round, count(*) AS n FROM samples GROUP BY round ORDER BY round").to_pylist()
    assert rows == [{"round": 0, "n": 12}, {"round": 1, "n": 8}]
    (row,) = store.query("SELECT correct, verifier_version FROM samples WHERE round = 0 AND sample_idx = 1 "
                         "AND prompt_id = ?", [store.prompt_ids["B"]]).to_pylist()
    assert row["verifier_version"] == "2" and row["correct"] is True


def test_kind_counts_query_from_the_issue(store):
    rows = store.read_only_query("select kind, count(*) as n from groups group by kind order by kind").to_pylist()
    assert rows == [{"kind": "mixed", "n": 2}, {"kind": "negative", "n": 2}, {"kind": "positive", "n": 1}]


def test_rescues_negative_then_not(store):
    rows = store.query("SELECT prompt_id, negative_round, rescued_round, rescued_kind FROM rescues").to_pylist()
    assert rows == [{"prompt_id": store.prompt_ids["A"], "negative_round": 0, "rescued_round": 1,
                     "rescued_kind": "mixed"}]


def test_confident_mistakes_are_wrong_and_sorted(store):
    rows = store.query("SELECT confidence FROM confident_mistakes WHERE round = 0").column("confidence").to_pylist()
    assert len(rows) == 2 + 4  # B's two wrong (after the re-score) + A's four wrong
    assert rows == sorted(rows, reverse=True)


def test_rounds_summary(store):
    rows = {r["round"]: r for r in store.query("SELECT * FROM rounds").to_pylist()}
    assert rows[0]["negative_groups"] == 1 and rows[0]["mixed_groups"] == 1 and rows[0]["positive_groups"] == 1
    assert rows[0]["accuracy"] == pytest.approx(6 / 12)
    assert rows[1]["rescued"] == 1 and rows[1]["policy_round"] == 0
    assert rows[1]["negative_share"] == pytest.approx(0.5)


def test_view_dependencies_match_duckdbs_parser():
    """A query binds only the views it names and what they read (fast start-up): the FROM/JOIN
    scan of the view files must find what DuckDB's own parser finds."""
    import re

    import duckdb

    import schemas

    con = duckdb.connect()
    for view, deps in schemas.dependencies().items():
        if view in schemas.CACHES:
            continue
        body = re.sub(r"(?is)^.*?CREATE\s+(OR\s+REPLACE\s+)?VIEW\s+\w+\s+AS", "",
                      re.sub(r"--[^\n]*", "", schemas.view_sql(view))).strip().rstrip(";")
        assert deps == con.get_table_names(body) & schemas.NAMES, view
