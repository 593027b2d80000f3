"""`replay import` + `replay score` on real reference solutions, through the CLI (issue 4's check).

MATH-500 rows from tests/fixtures (MIT, OpenAI): each solution imported as the completion of its
own problem must verify; shifted onto the next problem's gold it must not (unless the golds agree).
"""

import json
from pathlib import Path

import pytest

from replay.store import Store
from tests._cli import invoke_ok as invoke

FIXTURE = Path(__file__).parent / "fixtures" / "math500_sample.jsonl"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import-score")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    own, shifted = tmp / "own.jsonl", tmp / "shifted.jsonl"
    own.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"],
                                       "completion": r["solution"]}) + "\n" for r in rows))
    shifted.write_text("".join(json.dumps({"problem": r["problem"], "answer": rows[(i + 1) % len(rows)]["answer"],
                                           "completion": r["solution"]}) + "\n" for i, r in enumerate(rows)))
    store = tmp / "store"
    for round, path in ((0, own), (1, shifted)):
        assert f"imported {len(rows)} rollouts" in invoke("import", path, "--store", store, "--round", round)
        invoke("score", "--store", store, "--round", round, "--workers", 2)
    return Store.open(store), rows


def test_own_solutions_verify_and_shifted_ones_do_not(scored):
    store, rows = scored
    by_round = {r["round"]: r for r in store.query(
        "SELECT round, count(*) AS n, count(*) FILTER (WHERE correct) AS correct, "
        "count(*) FILTER (WHERE status <> 'ok') AS not_ok FROM samples GROUP BY round").to_pylist()}
    assert by_round[0] == {"round": 0, "n": len(rows), "correct": len(rows), "not_ok": 0}
    assert by_round[1]["n"] == len(rows) and by_round[1]["correct"] <= 1  # ≤ 1 % of 41 rounds to 0 or 1


def test_imported_rows_are_marked_for_learn_and_score_reruns_add_nothing(scored):
    store, rows = scored
    marked = store.query("SELECT count(*) AS n FROM rollouts WHERE completion_logprobs IS NULL "
                         "OR len(completion_logprobs) = 0").column("n")[0].as_py()
    assert marked == 2 * len(rows)
    out = invoke("score", "--store", store.root, "--round", 0)
    assert "scored 0" in out and f"{len(rows)} already scored" in out


def test_an_import_rerun_that_adds_nothing_keeps_the_manifest_of_the_run_that_did(scored, tmp_path):
    store, rows = scored
    manifest = store.manifest_path(0, "import")
    before = manifest.read_bytes()
    own = tmp_path / "own.jsonl"  # same name, same source label, same prompt ids
    own.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"], "completion": r["solution"]})
                           + "\n" for r in (json.loads(line) for line in FIXTURE.read_text().splitlines())))
    out = invoke("import", own, "--store", store.root, "--round", 0)
    assert "imported 0 rollouts" in out and f"{len(rows)} groups already stored" in out
    assert manifest.read_bytes() == before  # when and how long the import took stays on record


def test_score_defaults_to_one_worker_per_usable_cpu(scored, tmp_path, monkeypatch):
    import stages.score

    store, rows = scored
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"], "completion": r["solution"]})
                           + "\n" for r in (json.loads(line) for line in FIXTURE.read_text().splitlines()[:3])))
    invoke("import", own, "--store", store.root, "--round", 5)
    monkeypatch.setattr(stages.score, "usable_cpus", lambda: 1)
    invoke("score", "--store", store.root, "--round", 5)
    assert store.read_manifest(5, "score")["config"]["workers"] == 1
