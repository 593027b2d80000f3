import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from replay.store import Store, StoreError, clean_temp_files, validate
from tests._store_rows import prompt_row, rollout_row, verdict_row


def test_create_open_and_schema_version(tmp_path):
    store = Store.create(tmp_path / "s", base_model="m")
    assert Store.open(tmp_path / "s").meta["schema_version"] == schemas.SCHEMA_VERSION
    meta = json.loads((store.root / "store.json").read_text())
    meta["schema_version"] = 999
    (store.root / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema version 999"):
        Store.open(store.root)


def test_open_missing_store_is_clear(tmp_path):
    with pytest.raises(StoreError, match="no replay store"):
        Store.open(tmp_path / "nope")


def test_validate_names_the_bad_column():
    row = rollout_row(0, "p", 0)
    row["sample_idx"] = "zero"
    with pytest.raises(StoreError, match=r"rollouts\.sample_idx"):
        validate("rollouts", pa.Table.from_pylist([row]))
    row = rollout_row(0, "p", 0)
    row["prompt_id"] = None
    with pytest.raises(StoreError, match=r"rollouts\.prompt_id: NULL"):
        validate("rollouts", [row])
    with pytest.raises(StoreError, match="lack column"):
        validate("verdicts", [{"round": 0}])
    with pytest.raises(StoreError, match="unknown column"):
        validate("verdicts", pa.table({"bogus": [1]}))


def test_write_is_partitioned_and_round_lives_in_the_path(tmp_path):
    store = Store.create(tmp_path)
    path = store.write("rollouts", [rollout_row(3, "p", 0), rollout_row(3, "p", 1)], round=3)
    assert path.parent.name == "round=3" and path.name.startswith("part-")
    assert "round" not in pq.read_schema(path).names
    got = store.query("SELECT round, count(*) AS n FROM rollouts GROUP BY round")
    assert got.to_pylist() == [{"round": 3, "n": 2}]
    with pytest.raises(StoreError, match="rounds"):
        store.write("rollouts", [rollout_row(1, "p", 0)], round=2)


def test_failed_write_leaves_no_visible_file(tmp_path, monkeypatch):
    store = Store.create(tmp_path)

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="No space left"):
        store.write("rollouts", [rollout_row(0, "p", 0)], round=0)
    monkeypatch.undo()
    directory = store.table_dir("rollouts", 0)
    assert list(directory.iterdir()) == []  # neither the part file nor the temp file
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 0}]


def test_readers_ignore_and_writers_clean_dead_temp_files(tmp_path):
    store = Store.create(tmp_path)
    directory = store.table_dir("rollouts", 0)
    directory.mkdir(parents=True)
    dead = directory / ".tmp-999999999-part-x.parquet"
    dead.write_bytes(b"half a file")
    live = directory / f".tmp-{os.getpid()}-part-y.parquet"
    live.write_bytes(b"being written")
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 0}]
    assert clean_temp_files(directory) == 1
    assert not dead.exists() and live.exists()


def test_manifest_round_trip_and_required_keys(tmp_path):
    store = Store.create(tmp_path)
    record = {k: None for k in schemas.MANIFEST_KEYS} | {"stage": "score", "round": 0, "status": "complete"}
    store.write_manifest(0, "score", record)
    assert store.read_manifest(0, "score")["status"] == "complete"
    assert store.read_manifest(0, "learn") is None
    with pytest.raises(StoreError, match="missing key"):
        store.write_manifest(0, "learn", {"stage": "learn"})


def test_empty_store_views_all_bind(tmp_path):
    store = Store.create(tmp_path)
    for view in (*schemas.TABLES, *schemas.VIEW_FILES, "stage_runs"):
        assert store.query(f"SELECT * FROM {view}").num_rows == 0


def test_stage_runs_view_lists_the_manifests_but_not_temp_files(tmp_path):
    from replay.manifests import finish_manifest, start_manifest

    store = Store.create(tmp_path)
    for round, stage, counts in ((0, "generate", {"rollouts_written": 8}), (1, "score", {"scored": 8})):
        store.write_manifest(round, stage, finish_manifest(start_manifest(stage, round, {}), counts))
    leftover = store.manifest_path(0, "score").with_name(".tmp-1-h00000000-x-score.json")
    leftover.write_text(store.manifest_path(0, "generate").read_text())  # a crashed writer's
    rows = store.read_only_query("SELECT stage, round, status, seconds >= 0 AS timed, "
                                 "counts->>'rollouts_written' AS written FROM stage_runs ORDER BY round").to_pylist()
    assert rows == [{"stage": "generate", "round": 0, "status": "complete", "timed": True, "written": "8"},
                    {"stage": "score", "round": 1, "status": "complete", "timed": True, "written": None}]


def test_prompts_table_is_flat(tmp_path):
    store = Store.create(tmp_path)
    store.write("prompts", [prompt_row("1+1?", "2")])
    assert [p.parent.name for p in store.files("prompts")] == ["prompts"]
    assert store.query("SELECT answer FROM prompts").to_pylist() == [{"answer": "2"}]
    store.write("verdicts", [verdict_row(0, "p", 0, True)])
    assert store.files("verdicts")[0].parent.name == "round=0"


def test_learn_metrics_written_before_the_gradient_share_columns_read_as_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import schemas

    store = Store.create(tmp_path / "store")
    old = {c.name: (1 if c.type.startswith("int") else "a" if c.type == "string" else 0.5)
           for c in schemas.COLUMNS["learn_metrics"] if not c.name.startswith("grad_share") and c.name != "round"}
    (store.root / "learn_metrics" / "round=0").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old]), store.root / "learn_metrics" / "round=0" / "part-old.parquet")
    rows = store.query("SELECT round, step, grad_share_negative, grad_share_mixed FROM learn_metrics").to_pylist()
    assert rows == [{"round": 0, "step": 1, "grad_share_negative": None, "grad_share_mixed": None}]
