"""The group summary written by `replay score`: the failure-group views read it, and give the same
answers as the row-level aggregation they replaced, on stores with imported rows, shards, re-scores,
partly scored and unscored rounds; doctor flags a summary that disagrees with its rows."""

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay import summary
from replay.read.doctor import check_store
from replay.store import Store
from stages.import_rollouts import ImportConfig
from stages.import_rollouts import run as import_run
from stages.score import ScoreConfig
from stages.score import run as score_run
from tests._store_rows import NOW, prompt_row, rollout_row, verdict_row

# The views as they were before the summary (schemas/views at commit 40a26d3): the reference.
REFERENCE_GROUPS = """
SELECT round, prompt_id, any_value(problem) AS problem, any_value(gold_answer) AS gold_answer,
    any_value(level) AS level, any_value(subject) AS subject, count(*) AS n,
    count(*) FILTER (WHERE correct) AS n_correct, avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) AS pass_rate,
    avg(confidence) AS mean_confidence, avg(confidence) FILTER (WHERE NOT correct) AS mean_wrong_confidence,
    CASE WHEN count(*) FILTER (WHERE correct) = 0 THEN 'negative'
         WHEN count(*) FILTER (WHERE correct) = count(*) THEN 'positive' ELSE 'mixed' END AS kind
FROM samples WHERE correct IS NOT NULL GROUP BY round, prompt_id"""
REFERENCE_ROUNDS = """
WITH r AS (SELECT round, count(*) AS rollouts, count(DISTINCT prompt_id) AS prompts,
           avg(num_completion_tokens) AS mean_tokens, max(policy_round) AS policy_round FROM rollouts GROUP BY round),
grp AS MATERIALIZED (SELECT round, prompt_id, kind, n, n_correct, mean_wrong_confidence FROM ref_groups),
s AS (SELECT round, sum(n) AS scored, sum(n_correct) / sum(n) AS accuracy,
      sum(mean_wrong_confidence * (n - n_correct)) / nullif(sum(n - n_correct), 0) AS mean_wrong_confidence
      FROM grp GROUP BY round),
g AS (SELECT round, count(*) FILTER (WHERE kind = 'negative') AS negative_groups,
      count(*) FILTER (WHERE kind = 'mixed') AS mixed_groups, count(*) FILTER (WHERE kind = 'positive') AS positive_groups,
      avg(CASE WHEN kind = 'negative' THEN 1.0 ELSE 0.0 END) AS negative_share FROM grp GROUP BY round),
x AS (SELECT rescued_round AS round, count(DISTINCT prompt_id) AS rescued FROM (
      SELECT a.prompt_id, min(b.round) AS rescued_round FROM grp a JOIN grp b ON b.prompt_id = a.prompt_id
      AND b.round > a.round WHERE a.kind = 'negative' AND b.kind <> 'negative' GROUP BY a.prompt_id, a.round)
      GROUP BY 1)
SELECT r.round, r.policy_round, r.prompts, r.rollouts, s.scored, s.accuracy,
       coalesce(g.negative_groups, 0) AS negative_groups, coalesce(g.mixed_groups, 0) AS mixed_groups,
       coalesce(g.positive_groups, 0) AS positive_groups, g.negative_share, coalesce(x.rescued, 0) AS rescued,
       r.mean_tokens, s.mean_wrong_confidence
FROM r LEFT JOIN s ON s.round = r.round LEFT JOIN g ON g.round = r.round LEFT JOIN x ON x.round = r.round"""
COMPARED = {  # view -> (reference query, order)
    "groups": ("SELECT * FROM ref_groups", "round, prompt_id"),
    "negative_groups": ("SELECT * FROM ref_groups WHERE kind = 'negative'", "round, prompt_id"),
    "rounds": (REFERENCE_ROUNDS, "round"),
}
LATER = NOW + dt.timedelta(days=1)


def answers(store: Store) -> dict[str, tuple[list, list]]:
    """Each view's rows next to the reference's, both as lists of dicts in one order."""
    con = store.connect()
    try:
        con.execute(f"CREATE TEMP VIEW ref_groups AS {REFERENCE_GROUPS}")
        out = {}
        for view, (reference, order) in COMPARED.items():
            mine = con.sql(f"SELECT * FROM {view} ORDER BY {order}").to_arrow_table()
            ref = con.sql(f"SELECT * FROM ({reference}) ORDER BY {order}").to_arrow_table()
            assert mine.schema.names == ref.schema.names, view
            assert [str(t) for t in mine.schema.types] == [str(t) for t in ref.schema.types], view
            out[view] = (mine.to_pylist(), ref.to_pylist())
        return out
    finally:
        con.close()


def assert_same_answers(store: Store) -> None:
    for view, (mine, ref) in answers(store).items():
        assert len(mine) == len(ref) and mine, view
        for a, b in zip(mine, ref):
            for key, value in b.items():
                expected = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
                assert a[key] == expected, (view, key, a, b)


def prompts(n: int, prefix: str) -> list[dict]:
    return [prompt_row(f"{prefix} {i}", answer=str(i), level=i % 3 + 1) for i in range(n)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summary")
    root = tmp / "store"
    # round 0: imported completions (no tokens, no logprobs: NULL confidence), scored for real
    data = tmp / "import.jsonl"
    data.write_text("".join(json.dumps({"problem": f"what is {i} + 1?", "answer": str(i + 1),
                                        "completion": f"the answer is \\boxed{{{i + 1 if k % (i + 1) else 0}}}"})
                            + "\n" for i in range(6) for k in range(3)))
    import_run(str(root), ImportConfig(round=0, file=str(data)))
    score_run(str(root), ScoreConfig(round=0, workers=1))
    store = Store.open(root)
    # rounds 1-2 sampled by the round before's policy; round 1 scored by two shards, round 2 by hand,
    # with a quarter of its rollouts still unscored; round 3 not scored at all
    ps = prompts(12, "problem")
    store.write("prompts", ps)
    for round in (1, 2, 3):
        store.write("rollouts", [rollout_row(round, p["prompt_id"], i, [-0.1 * (i + 1)] * (1 + (i + j) % 4),
                                             text=f"\\boxed{{{(i * j) % 3}}}", policy_round=round - 1)
                                 for j, p in enumerate(ps) for i in range(4)], round=round)
    for shard in ("0/2", "1/2"):  # rounds written by hand have no generate manifest: --partial
        score_run(str(root), ScoreConfig(round=1, workers=1, shard=shard, partial=True))
    store.write("verdicts", [verdict_row(2, p["prompt_id"], i, (i + j) % 3 == 0)
                             for j, p in enumerate(ps) for i in range(4) if (i + j) % 4], round=2)
    store.prompts = ps
    return store


def test_score_writes_a_current_summary_that_the_views_read(store):
    fresh, stale = summary.split_rounds(store)
    assert sorted(fresh) == [0, 1] and stale == [2, 3]  # round 2 was scored by hand, 3 not at all
    # each shard wrote one; the first shard's is outdated, kept a while for readers that listed it
    files = list(fresh[1].parent.iterdir())
    assert len(files) == 2 and fresh[1] in files
    assert_same_answers(store)


def test_views_equal_the_row_aggregation_after_a_rescore_then_its_summary(store):
    # a re-score (newer verdicts for some rollouts of round 1) makes round 1's summary outdated ...
    flips = [verdict_row(1, p["prompt_id"], 0, j % 2 == 0, scored_at=LATER, version="2")
             for j, p in enumerate(store.prompts[:6])]
    store.write("verdicts", flips, round=1)
    assert 1 not in summary.split_rounds(store)[0]
    assert_same_answers(store)  # ... so round 1 is aggregated from its rows
    # the next score of round 1 finds nothing to verify, and writes the current summary
    record = score_run(str(store.root), ScoreConfig(round=1, workers=1, partial=True))
    assert record["counts"]["scored"] == 0
    score_run(str(store.root), ScoreConfig(round=2, workers=1, partial=True))  # verifies round 2's missing quarter
    assert sorted(summary.split_rounds(store)[0]) == [0, 1, 2]
    assert_same_answers(store)
    assert check_store(store.root) == []


def test_a_late_generate_makes_the_round_read_its_rows(store, tmp_path):
    extra = prompt_row("a late problem", answer="1")
    store.write("prompts", [extra])
    store.write("rollouts", [rollout_row(0, extra["prompt_id"], i) for i in range(3)], round=0)
    assert 0 not in summary.split_rounds(store)[0]
    assert_same_answers(store)


def test_a_summary_of_other_numbers_is_read_and_doctor_flags_it(tmp_path):
    store = Store.create(tmp_path / "s")
    p = prompt_row("2+2?", "4")
    store.write("prompts", [p])
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i) for i in range(4)], round=0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], i, i == 0) for i in range(4)], round=0)
    assert [str(x) for x in check_store(store.root)] == [
        f"warning: {store.root}/group_summary/round=0: round 0 has no current group summary (written before "
        "summaries existed, or rows were added since): its failure-group queries read every row; "
        "`replay score --round 0` writes it"]
    path = summary.refresh(store, 0)
    assert check_store(store.root) == []
    # the same file with one number changed: the views answer from it (they do not re-aggregate) ...
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("n_correct"), "n_correct", pa.array([0], pa.int64()))
    table = table.set_column(table.schema.get_field_index("kind"), "kind", pa.array(["negative"]))
    pq.write_table(table, path)
    assert store.query("SELECT n_correct, kind FROM groups").to_pylist() == [{"n_correct": 0, "kind": "negative"}]
    # ... and doctor names the file
    (problem,) = check_store(store.root)
    assert problem.severity == "error" and problem.path == path
    assert "disagrees with its rollouts and verdicts in 1 group(s)" in problem.message


def test_refresh_drops_a_summary_whose_inputs_changed_while_it_was_computed(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "s")
    p = prompt_row("2+2?", "4")
    store.write("prompts", [p])
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i) for i in range(2)], round=0)
    write, calls = store.write, []

    def a_verdict_lands_before_the_summary(table, data, **kw):
        if table == "group_summary" and not calls:  # another worker's verdicts, after our read
            write("verdicts", [verdict_row(0, p["prompt_id"], 0, True)], round=0)
        calls.append(table)
        return write(table, data, **kw)

    monkeypatch.setattr(store, "write", a_verdict_lands_before_the_summary)
    path = summary.refresh(store, 0)
    assert calls == ["group_summary", "group_summary"] and path == summary.current_path(store, 0)
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # the outdated one was removed
    assert pq.read_table(path).column("n").to_pylist() == [1]


def test_outdated_summaries_are_deleted_only_after_a_grace_period(tmp_path):
    import os
    import time

    store = Store.create(tmp_path / "s")
    p = prompt_row("2+2?", "4")
    store.write("prompts", [p])
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i) for i in range(2)], round=0)
    old = summary.refresh(store, 0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], 0, True)], round=0)
    recent = summary.refresh(store, 0)
    assert old.exists() and recent != old  # a reader may have listed `old` a moment ago
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    store.write("verdicts", [verdict_row(0, p["prompt_id"], 1, True)], round=0)
    current = summary.refresh(store, 0)
    assert not old.exists() and recent.exists() and current.exists()
