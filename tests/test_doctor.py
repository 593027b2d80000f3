"""`replay doctor` on a hand-built healthy store, then on copies with one fault injected each."""

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

import schemas
from replay import summary
from replay.read.doctor import Problem, check_store, diagnose
from replay.errors import ReplayError
from replay.manifests import finish_manifest, start_manifest
from replay.store import Store
from tests._store_rows import prompt_row, rollout_row, verdict_row

G = 4
NOW_LATER = dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc)


def manifest(stage, round, counts, config=None):
    return finish_manifest(start_manifest(stage, round, config or {}), counts)


def learn_rows(round, prompts):
    audit = [dict(round=round, adapter_name="main", prompt_id=p["prompt_id"], sample_idx=i, rollout_round=round,
                  objective="lens", confidence=0.5, shaped_reward=0.0, advantage=0.0, weight=1.0,
                  group_kind="mixed", num_tokens=2, origin="group", behaviour_round=round)
             for p in prompts for i in range(G)]
    metrics = [dict(round=round, adapter_name="main", objective="lens", step=s, epoch=0, loss=0.1, clip_frac=0.0,
                    dual_clip_frac=0.0, ratio_mean=1.0, ratio_max=1.0, grad_norm=1.0, tokens=10,
                    nonzero_adv_share=1.0, negative_group_share=0.0, lr=1e-5, seconds=0.1, grad_share_negative=None,
                    grad_share_mixed=1.0, grad_share_positive=0.0, replayed_rows=None, replay_mean_age=None,
                    behaviour_weight_mean=None, behaviour_weight_max=None, behaviour_truncated_share=None,
                    behaviour_masked_share=None, replay_ess=None) for s in range(2)]
    return audit, metrics


def write_adapter(directory):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": np.zeros((2, 8), np.float32),
               "base_model.model.layers.0.q_proj.lora_B.weight": np.zeros((8, 2), np.float32)},
              str(directory / "adapter_model.safetensors"))
    (directory / "manifest.json").write_text(json.dumps({"round": 0, "objective": "lens"}))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """Two rounds of 3 prompts x G samples, scored; round 0 learned (audit, metrics, adapter)."""
    store = Store.create(tmp_path_factory.mktemp("healthy") / "store", base_model="test-model")
    prompts = [prompt_row(f"problem {i}", str(i)) for i in range(3)]
    store.write("prompts", prompts)
    for round in (0, 1):
        rollouts = [rollout_row(round, p["prompt_id"], i) for p in prompts for i in range(G)]
        store.write("rollouts", rollouts[:2 * G], round=round)  # two part files: groups 0-1 and group 2
        store.write("rollouts", rollouts[2 * G:], round=round)
        store.write("verdicts", [verdict_row(round, r["prompt_id"], r["sample_idx"], r["sample_idx"] == 0)
                                 for r in rollouts], round=round)
        store.write_manifest(round, "generate", manifest("generate", round, {"prompts": 3, "groups_written": 3},
                                                         {"num_samples": G}))
        store.write_manifest(round, "score", manifest("score", round, {"rollouts": 3 * G, "scored": 3 * G}))
        summary.refresh(store, round)  # as `replay score` ends
    audit, metrics = learn_rows(0, prompts)
    store.write("learn_audit", audit, round=0, name="main")
    store.write("learn_metrics", metrics, round=0, name="main")
    write_adapter(store.adapter_dir(0))
    store.write_manifest(0, "learn", manifest("learn", 0, {"samples": 3 * G, "optimizer_steps": 2}))
    store.prompts = prompts
    return store


@pytest.fixture()
def store(healthy, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(healthy.root, root)
    copy = Store.open(root)
    copy.prompts = healthy.prompts
    return copy


def errors(store, deep=False):
    return [p for p in check_store(store.root, deep=deep) if p.severity == "error"]


def one_error(store, deep=False) -> Problem:
    found = errors(store, deep)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def corrupt_first_text_page(shard):
    meta = pq.ParquetFile(shard).metadata.row_group(0)
    text = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "completion_text")
    start = text.dictionary_page_offset or text.data_page_offset
    data = bytearray(shard.read_bytes())
    data[start:start + 16] = b"\xff" * 16  # the page header no longer parses
    shard.write_bytes(bytes(data))


def test_healthy_store_passes_with_a_summary(healthy):
    result = diagnose(healthy.root, deep=True)
    assert result.problems == []
    assert result.rows["rollouts"] == 2 * 3 * G and result.rows["verdicts"] == 2 * 3 * G
    assert (result.files, result.manifests, result.adapters) == (11, 5, 1)  # 2 of them group summaries
    assert result.summary().startswith(f"ok: {healthy.root}: 11 Parquet files (prompts 3, rollouts 24, verdicts 24")


def test_truncated_rollouts_file_is_named(store):
    shard = store.files("rollouts", 0)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems = errors(store)
    assert problems[0].path == shard and "unreadable Parquet file" in problems[0].message
    # its rows are gone from the cross-file checks: their verdicts are orphans, the manifest is short
    assert {p.path.parent.parent.name for p in problems[1:]} == {"verdicts", "manifests"}
    assert "\n" not in str(problems[0])


def test_corrupt_page_behind_a_sound_footer_is_named(store):
    shard = store.files("rollouts", 1)[0]
    corrupt_first_text_page(shard)
    assert errors(store) == []  # the footer checks and the key columns do not touch that page
    problem, *consequences = errors(store, deep=True)
    assert problem.path == shard and "corrupt data pages" in problem.message
    assert {p.path.parent.parent.name for p in consequences} == {"verdicts", "manifests"}


@pytest.mark.parametrize("change, expected", [
    (lambda row: row | {"sample_idx": str(row["sample_idx"])}, "column sample_idx is string, expected int32"),
    (lambda row: {k: v for k, v in row.items() if k != "finish_reason"}, "missing column(s) finish_reason"),
    (lambda row: row | {"bogus": 1.0}, "unknown column(s) bogus"),
    (lambda row: row | {"round": 0}, "has a 'round' column"),
])
def test_a_file_of_the_wrong_schema_is_named(store, change, expected):
    row = rollout_row(0, "x", 0)
    del row["round"]
    path = store.table_dir("rollouts", 0) / "part-wrong.parquet"
    pq.write_table(pa.Table.from_pylist([change(row)]), path)
    problem = one_error(store)
    assert problem.path == path and "schema mismatch" in problem.message and expected in problem.message


def test_null_in_a_required_column_is_named(store):
    row = rollout_row(0, store.prompts[0]["prompt_id"], 0) | {"completion_text": None}
    schema = pa.schema([f.with_nullable(True) for f in schemas.TABLES["rollouts"] if f.name != "round"])
    path = store.table_dir("rollouts", 2) / "part-nulls.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=schema), path)
    problem = one_error(store)
    assert problem.path == path and "NULLs in required column(s) completion_text" in problem.message


def test_duplicate_rollout_key_names_both_files(store):
    first = store.files("rollouts", 0)
    dup = store.write("rollouts", [rollout_row(0, store.prompts[0]["prompt_id"], 1)], round=0)
    problem = one_error(store)
    holder = next(p for p in first if pq.read_table(p).num_rows == 2 * G)
    assert {problem.path, *map(Path, re.findall(r"also in (\S+) ", problem.message))} == {dup, holder}
    assert f"prompt_id {store.prompts[0]['prompt_id']}, sample_idx 1" in problem.message
    assert "1 duplicate keys in all" in problem.message


def test_every_table_with_a_duplicate_key_is_an_error(store):
    pid = store.prompts[0]["prompt_id"]
    # what two concurrent `replay score` runs of one verifier left behind before stages took locks
    store.write("verdicts", [verdict_row(1, pid, i, False, scored_at=NOW_LATER) for i in range(G)], round=1)
    audit, metrics = learn_rows(0, store.prompts)
    store.write("learn_audit", audit[:1], round=0, name="other-run")
    store.write("learn_metrics", metrics[:1], round=0, name="other-run")
    messages = " | ".join(p.message for p in errors(store))
    assert messages.count("duplicate verdicts key") == G and messages.count("duplicate learn_") == 2
    assert f"duplicate verdicts key (round 1, prompt_id {pid}, sample_idx 0, verifier_version 1): 2 rows" in messages
    assert f"{G} duplicate keys in all" in messages
    assert "duplicate learn_audit key (round 0, adapter_name main" in messages
    assert "duplicate learn_metrics key (round 0, adapter_name main, step 0)" in messages


def test_a_rescore_by_a_new_verifier_version_is_no_duplicate(store):
    pid = store.prompts[0]["prompt_id"]
    store.write("verdicts", [verdict_row(1, pid, i, True, scored_at=NOW_LATER, version="2") for i in range(G)],
                round=1)
    assert errors(store) == []


def test_an_identical_copy_of_a_prompt_row_is_a_warning(store):
    store.write("prompts", [store.prompts[1]])
    found = check_store(store.root)
    assert [p.severity for p in found] == ["warning"] and "duplicate prompts key" in found[0].message


def test_orphan_verdict_is_named(store):
    path = store.write("verdicts", [verdict_row(1, store.prompts[2]["prompt_id"], 9, True)], round=1)
    problem = one_error(store)
    assert problem.path == path and problem.message.startswith("1 verdicts without a rollout")
    assert "sample_idx 9" in problem.message


def test_rollouts_of_an_unregistered_prompt_are_named(store):
    path = store.write("rollouts", [rollout_row(0, "unregistered", i) for i in range(G)], round=0)
    problem = one_error(store)
    assert problem.path == path and f"{G} rollouts whose prompt_id is not in prompts" in problem.message


def test_incomplete_group_against_the_generate_manifest(store):
    extra = prompt_row("problem 3", "3")
    store.write("prompts", [extra])
    path = store.write("rollouts", [rollout_row(1, extra["prompt_id"], i) for i in range(G - 1)], round=1)
    problem = one_error(store)
    assert problem.path == path
    assert f"round 1: 1 group(s) of {G - 1} samples, manifests/round=1/generate.json says {G}" in problem.message


def test_incomplete_group_without_a_manifest_uses_the_round_majority(store):
    shutil.rmtree(store.root / "manifests")
    victim = store.files("rollouts", 0)[-1]
    pq.write_table(pq.read_table(victim).slice(1), victim)  # one sample of one group lost
    orphan, problem = errors(store)
    assert orphan.path.parent == store.table_dir("verdicts", 0) and "1 verdicts without a rollout" in orphan.message
    assert problem.path == victim and f"of {G - 1} samples, most groups of the round says {G}" in problem.message


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_text(p.read_text()[:40]), "corrupt manifest"),
    (lambda p: p.write_bytes(b"\xff\xfe"), "corrupt manifest"),
    (lambda p: p.write_text(json.dumps([1, 2])), "lacks key(s) all"),
    (lambda p: p.write_text(json.dumps({"stage": "score", "round": 0})), "lacks key(s) status, started_at"),
    (lambda p: p.write_text(p.read_text().replace('"round": 0', '"round": 1')), "at the path of 'score' round 0"),
    (lambda p: p.write_text(p.read_text().replace('"rollouts": 12', '"rollouts": 13')),
     "complete score recorded 13 rollouts, but the files of round 0 hold 12 scored rollouts"),
])
def test_bad_manifest_is_named(store, damage, expected):
    path = store.manifest_path(0, "score")
    damage(path)
    problem = one_error(store)
    assert problem.path == path and expected in problem.message


def test_generate_manifest_with_more_prompts_than_stored_groups(store):
    victim = next(p for p in store.files("rollouts", 1) if pq.read_table(p).num_rows == G)
    for verdicts in store.files("verdicts", 1):
        verdicts.unlink()
    victim.unlink()
    path = store.manifest_path(1, "generate")
    problem = next(p for p in errors(store) if p.path == path)
    assert "recorded 3 prompts, but the files of round 1 hold 2 groups" in problem.message


def test_learn_manifest_counts_and_adapter_directory(store):
    for part in store.files("learn_metrics", 0):
        part.unlink()
    problem = one_error(store)
    assert problem.path == store.manifest_path(0, "learn")
    assert "recorded 2 optimizer_steps, but learn_metrics holds 0 rows" in problem.message
    shutil.rmtree(store.adapter_dir(0))
    assert any("adapter directory" in p.message and "is missing" in p.message for p in errors(store))


def test_truncated_adapter_weights_are_named(store):
    weights = store.adapter_dir(0) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    problem = one_error(store)
    assert problem.path == weights and "unreadable safetensors file" in problem.message


@pytest.mark.parametrize("name, damage, expected", [
    ("adapter_config.json", lambda p: p.unlink(), "unreadable adapter config"),
    ("adapter_config.json", lambda p: p.write_text("{}"), "no peft_type"),
    ("adapter_model.safetensors", lambda p: p.unlink(), "unreadable safetensors file"),
    ("adapter_model.safetensors", lambda p: p.write_bytes(b"not a tensor file at all"), "unreadable safetensors"),
])
def test_broken_adapter_dir_is_named(store, name, damage, expected):
    path = store.adapter_dir(0) / name
    damage(path)
    problem = one_error(store)
    assert problem.path == path and expected in problem.message


def test_dead_writers_temp_files_are_warnings_and_live_ones_are_ignored(store):
    directory = store.table_dir("rollouts", 0)
    dead = directory / ".tmp-999999999-part-x.parquet"
    dead.write_bytes(b"half a file")
    dead_dir = store.root / "adapters" / ".tmp-999999999-abc"
    dead_dir.mkdir()
    (dead_dir / "adapter_model.safetensors").write_bytes(b"")
    (directory / f".tmp-{os.getpid()}-part-y.parquet").write_bytes(b"being written")
    problems = check_store(store.root)
    assert sorted((p.path, p.severity) for p in problems) == sorted([(dead, "warning"), (dead_dir, "warning")])
    assert "; 2 warning(s)" in diagnose(store.root).summary()


def test_eval_stores_inside_the_store_are_checked_too(store, healthy):
    inner = store.root / "evals" / "main-r0"
    shutil.copytree(healthy.root, inner)
    result = diagnose(store.root)
    assert result.problems == [] and result.eval_stores == 1 and "1 eval stores" in result.summary()
    shard = sorted((inner / "verdicts").rglob("part-*.parquet"))[0]
    shard.write_bytes(b"PAR1")
    found = errors(store)
    assert found[0].path == shard and all(inner in p.path.parents for p in found)


def test_round_directory_that_is_not_an_integer(store):
    bad = store.root / "verdicts" / "round=abc"
    bad.mkdir()
    shutil.copy(store.files("verdicts", 0)[0], bad / "part-x.parquet")
    problem = one_error(store)
    assert problem.path == bad and "round 'abc' is not an integer" in problem.message


def test_store_json_missing_or_of_another_version_stops_the_check(store, tmp_path):
    meta = store.root / "store.json"
    meta.write_text(json.dumps({"schema_version": schemas.SCHEMA_VERSION + 1}))
    (problem,) = check_store(store.root)
    assert problem.path == meta and f"schema version {schemas.SCHEMA_VERSION + 1}" in problem.message
    (problem,) = check_store(tmp_path / "nothing")
    assert problem.path == tmp_path / "nothing" / "store.json" and "not a replay store" in problem.message
    meta.write_text("{truncated")
    assert one_error(store).path == meta  # and the data files are still checked


@pytest.mark.parametrize("method", ["query", "read_only_query"])
def test_store_queries_over_a_truncated_shard_name_the_file(store, method):
    shard = store.files("rollouts", 0)[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ReplayError, match=re.escape(shard.name)):
        getattr(store, method)("SELECT count(*) FROM rollouts")


@pytest.mark.parametrize("method", ["query", "read_only_query"])
def test_store_queries_over_a_corrupt_page_point_at_the_deep_doctor(store, method):
    corrupt_first_text_page(store.files("rollouts", 1)[0])  # DuckDB's own message names no file then
    with pytest.raises(ReplayError, match=re.escape(f"replay doctor --store {store.root} --deep")) as caught:
        getattr(store, method)("SELECT max(completion_text) FROM rollouts")
    assert "\n" not in str(caught.value)


def test_doctor_command(store):
    from replay.cli import app

    runner = CliRunner()
    for flags in ([], ["--deep"]):
        ok = runner.invoke(app, ["doctor", "--store", str(store.root), *flags])
        assert ok.exit_code == 0 and ok.output.startswith("ok: ") and len(ok.output.splitlines()) == 1, ok.output
    shard = store.files("rollouts", 0)[0]
    shard.write_bytes(shard.read_bytes()[:100])
    bad = runner.invoke(app, ["doctor", "--store", str(store.root)])
    assert bad.exit_code == 1 and str(shard) in bad.output and "Traceback" not in bad.output
    assert bad.output.splitlines()[0] == f"error: {shard}: " + " ".join(errors(store)[0].message.split())
    assert bad.output.splitlines()[-1].startswith("error: ") and "error(s) in the store" in bad.output.splitlines()[-1]


def test_doctor_command_on_a_corrupt_page_needs_deep(store):
    from replay.cli import app

    shard = store.files("rollouts", 1)[0]
    corrupt_first_text_page(shard)
    runner = CliRunner()
    assert runner.invoke(app, ["doctor", "--store", str(store.root)]).exit_code == 0
    deep = runner.invoke(app, ["doctor", "--store", str(store.root), "--deep"])
    assert deep.exit_code == 1 and f"error: {shard}: corrupt data pages" in deep.output


def test_doctor_command_on_a_missing_store(tmp_path):
    from replay.cli import app

    result = CliRunner().invoke(app, ["doctor", "--store", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "not a replay store" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "nothing").exists()
