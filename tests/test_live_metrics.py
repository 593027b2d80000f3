"""--report-to: learn's per-step metrics, eval's pass@k and a round's group shares stream to
TensorBoard event files (read back here with TensorBoard's own reader) and to an offline W&B run."""

import importlib.util
import os

import pytest

from replay.cli.settings import load_settings
from replay.errors import ReplayError
from replay.metrics_sink import check_report_to, scalars
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model
from tests.test_round import CONFIG

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="tensorboard not installed (pip install 'replay-rlvr[tensorboard]')")


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_keep_finite_numbers_only():
    assert scalars({"loss": 0.5, "step": 3, "objective": "lens", "x": None, "nan": float("nan"), "ok": True}) == \
        {"loss": 0.5, "step": 3.0, "ok": 1.0}


def test_unknown_or_missing_backend_is_refused_before_any_work(monkeypatch):
    with pytest.raises(ReplayError, match="use one of none, tensorboard, wandb"):
        check_report_to("mlflow")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ReplayError, match=r"pip install 'replay-rlvr\[wandb\]'"):
        check_report_to("wandb")


def test_round_table_in_the_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[round]\nreport_to = "tensorboard"\n[learn]\nreport_to = "none"\n')
    settings = load_settings(str(path))
    assert settings["round"] == {"report_to": "tensorboard"} and settings["learn"]["report_to"] == "none"
    with pytest.raises(ReplayError, match="unknown setting 'reportto'"):
        load_settings(None, ["round.reportto=wandb"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("live") / "store"
    invoke_ok("generate", "--store", root, "--num-prompts", 4, "-G", 4, "--max-new-tokens", 6, "--engine",
              "transformers", "--model", tiny, "--seed", 7, "--levels", "1", "--quiet")
    invoke_ok("score", "--store", root, "--workers", 1, "--quiet")
    return root


@needs_tb
def test_learn_streams_every_step_to_tensorboard(scored_store):
    invoke_ok("learn", "--store", scored_store, "--objective", "nsr", "--micro-batch-size", 2, "--grad-accum", 1,
              "--lr", "1e-3", "--report-to", "tensorboard", "--quiet")
    rows = Store.open(scored_store).query("SELECT step, loss, grad_norm, clip_frac, tokens FROM learn_metrics "
                                          "WHERE round = 0 ORDER BY step").to_pylist()
    assert len(rows) >= 2
    logged = read_scalars(scored_store / "logs" / "tb" / "learn-main-r0")
    for key in ("loss", "grad_norm", "clip_frac", "tokens"):
        assert [step for step, _ in logged[key]] == [r["step"] for r in rows]
        assert [value for _, value in logged[key]] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-7)
    assert "objective" not in logged and "adapter_name" not in logged


@needs_tb
def test_eval_logs_passk_of_its_round(scored_store):
    invoke_ok("eval", "--store", scored_store, "--base", "--num-prompts", 3, "-n", 2, "--max-new-tokens", 4,
              "--engine", "transformers", "--workers", 1, "--report-to", "tensorboard", "--quiet")
    rows = Store.open(scored_store).query("SELECT group_by, group_value, k, pass_at_k FROM eval_passk "
                                          "WHERE round = -1").to_pylist()
    logged = read_scalars(scored_store / "logs" / "tb" / "eval-base")
    overall = {r["k"]: r["pass_at_k"] for r in rows if r["group_by"] == "all"}
    assert set(overall) == {1, 2}
    for k, value in overall.items():
        assert logged[f"pass@{k}"] == [(0, pytest.approx(value, abs=1e-7))]
    level = next(r for r in rows if r["group_by"] == "level")
    assert f"level={level['group_value']}/pass@{level['k']}" in logged


@needs_tb
def test_round_logs_group_shares_and_rescues_and_learn_steps(tmp_path, tiny):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(model=tiny) + '\n[round]\nreport_to = "tensorboard"\n')
    store = tmp_path / "store"
    result = invoke("round", "--store", store, "--config", config, "--rounds", 2, "--quiet")
    assert result.exit_code == 0, result.output
    summary = Store.open(store).query("SELECT * FROM rounds ORDER BY round").to_pylist()
    logged = read_scalars(store / "logs" / "tb" / "rounds")
    assert [step for step, _ in logged["accuracy"]] == [0, 1]
    for r in summary:
        groups = r["negative_groups"] + r["mixed_groups"] + r["positive_groups"]
        point = {tag: dict(values)[r["round"]] for tag, values in logged.items()}
        assert point["accuracy"] == pytest.approx(r["accuracy"], abs=1e-7)
        assert point["negative_share"] == pytest.approx(r["negative_groups"] / groups, abs=1e-7)
        assert point["positive_share"] == pytest.approx(r["positive_groups"] / groups, abs=1e-7)
        assert point["rescued"] == r["rescued"]
    for r in (0, 1):  # learn took [round] report_to too
        assert read_scalars(store / "logs" / "tb" / f"learn-main-r{r}")["loss"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb not installed (pip install 'replay-rlvr[wandb]')")
def test_wandb_offline_writes_its_run_directory(scored_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    invoke_ok("learn", "--store", scored_store, "--objective", "nsr", "--adapter-name", "wb", "--micro-batch-size",
              2, "--grad-accum", 1, "--report-to", "wandb", "--quiet")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    assert list(runs[0].glob("run-*.wandb")) and (runs[0] / "files").is_dir()
