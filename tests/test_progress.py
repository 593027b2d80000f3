"""Progress without a terminal: plain lines at an interval (every stage of a round, redirected to a
file), a heartbeat while nothing advances, and --quiet."""

import os
import re
import subprocess
import sys
import time

import pytest

from replay import progress
from tests._tiny_model import save_tiny_model
from tests.test_round import CONFIG


def test_progress_line_rate_and_eta_count_only_this_runs_work():
    # 10 of 120 were done before; 20 more in 10 s -> 2 prompts/s, 90 left -> 45 s
    line = progress.progress_line("generate round 3", "prompts", 30, 120, 10, 10.0, "512 tok/s")
    assert line == "[generate round 3] 30/120 prompts (25%), elapsed 10s, 2 prompts/s, ETA 45s, 512 tok/s"
    slow = progress.progress_line("learn round 0", "steps", 2, 10, 0, 90.0)
    assert "45 s/step" in slow and "ETA 6m00s" in slow
    assert progress.progress_line("x", "steps", 0, 10, 0, 5.0) == "[x] 0/10 steps (0%), elapsed 5s"
    assert progress.duration(7325) == "2h02m"


@pytest.mark.parametrize("value, seconds", [("10", 10.0), ("0", 0.05), ("inf", 86400.0), ("nan", 30.0),
                                            ("soon", 30.0), ("", 30.0)])
def test_interval_setting_is_clamped(monkeypatch, value, seconds):
    monkeypatch.setenv(progress.INTERVAL_ENV, value)
    assert progress.interval() == seconds


def test_plain_lines_keep_coming_while_a_batch_takes_long(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    with progress.progress_bar("score round 1", total=5, unit="verdicts") as bar:
        time.sleep(0.4)  # one long batch: no advance, yet the log must show the stage is alive
        bar.advance(5, "3 verdicts/s")
    lines = capsys.readouterr().err.strip().splitlines()
    waiting = [ln for ln in lines if ln.startswith("[score round 1] 0/5 verdicts")]
    assert len(waiting) >= 3, lines
    assert lines[-1].startswith("done [score round 1] 5/5 verdicts (100%)") and "3 verdicts/s" in lines[-1]


def test_a_failing_stage_says_stopped_not_done(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "60")
    with pytest.raises(RuntimeError):
        with progress.progress_bar("learn round 0", total=3, unit="steps") as bar:
            bar.advance(1)
            raise RuntimeError("boom")
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped [learn round 0] 1/3 steps")


def test_quiet_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.01")
    monkeypatch.setenv(progress.QUIET_ENV, "1")
    with progress.progress_bar("generate round 0", total=2) as bar:
        time.sleep(0.05)
        bar.advance(2)
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG.format(model=model))
    return path, model


def _replay(args, log_path, **env):
    """`replay ARGS` with stdout and stderr redirected to a file, as under cron."""
    environ = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    environ.pop(progress.QUIET_ENV, None)
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-m", "replay", *map(str, args)], stdout=log, stderr=log,
                              env=environ, timeout=600)
    text = log_path.read_text()
    assert done.returncode == 0, text
    return text


def test_a_round_redirected_to_a_file_logs_progress_of_every_stage(tmp_path, tiny_config):
    config, _ = tiny_config
    text = _replay(["round", "--store", tmp_path / "store", "--config", config], tmp_path / "round.log",
                   **{progress.INTERVAL_ENV: "0.2"})
    for stage, unit in (("generate", "prompts"), ("score", "verdicts"), ("learn", "steps")):
        lines = [ln for ln in text.splitlines() if re.match(rf"(done )?\[{stage} round 0\b.*\] \d+/\d+ {unit}", ln)]
        assert lines, f"no {stage} progress in:\n{text}"
        assert lines[-1].startswith("done "), lines
    learn_done = next(ln for ln in text.splitlines() if ln.startswith("done [learn round 0"))
    assert re.search(r"loss [+-]\d", learn_done) and "tok/s" in learn_done, learn_done
    assert "steps/s" in learn_done or "s/step" in learn_done, learn_done
    assert "\r" not in text and "\x1b[" not in text  # no terminal control codes in a log file


def test_quiet_generate_prints_only_its_result(tmp_path, tiny_config):
    _, model = tiny_config
    args = ["generate", "--store", tmp_path / "store", "--num-prompts", 2, "-G", 2, "--max-new-tokens", 4,
            "--engine", "transformers", "--model", model, "--quiet"]
    text = _replay(args, tmp_path / "gen.log", **{progress.INTERVAL_ENV: "0.01"})
    assert "2 groups written" in text, text
    assert "[generate" not in text and "elapsed" not in text, text
