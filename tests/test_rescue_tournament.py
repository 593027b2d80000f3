"""examples/rescue_tournament.sh end to end on a tiny configuration (every arm, one seed; a rerun
writes nothing), and examples/rescue_tournament_decision.py: its tables, and the pre-registered rule
worked on hand-made per-prompt numbers."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replay.store import Store
from tests._tiny_model import save_tiny_model

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "examples" / "rescue_tournament.sh"
DECISION = ROOT / "examples" / "rescue_tournament_decision.py"
ARMS = ("grpo", "lens", "rescue-sampling", "replay", "hint")
TABLES = ("rollouts", "verdicts", "group_summary", "learn_metrics", "learn_audit", "prompts", "eval")


def decision_module():
    spec = importlib.util.spec_from_file_location("rescue_tournament_decision", DECISION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the rule on hand-made numbers -------------------------------------------------------------------
def _seeds(*per_seed):
    return {seed: {f"p{i}": v for i, v in enumerate(values)} for seed, values in enumerate(per_seed)}


GRPO = _seeds([0.25, 0.5, 0.0, 0.125], [0.25, 0.375, 0.0, 0.25], [0.125, 0.5, 0.125, 0.125])


def test_an_arm_better_in_every_seed_with_an_interval_above_zero_beats_grpo():
    d = decision_module()
    # +0.25 on p1 and +0.125 on the others in every seed: per seed (0.25 + 3 x 0.125) / 4 = +0.15625,
    # and every prompt's pooled difference is at least +0.125, so is every resample's mean
    arm = {s: {p: v + (0.25 if p == "p1" else 0.125) for p, v in GRPO[s].items()} for s in GRPO}
    result = d.decide(arm, GRPO)
    assert result["per_seed"] == {s: pytest.approx(0.15625) for s in (0, 1, 2)}
    assert result["mean"] == pytest.approx(0.15625) and 0.125 <= result["low"] <= result["high"] <= 0.25
    assert result["verdict"] == d.BEATS == "beats GRPO"


def test_one_seed_worse_or_an_interval_with_zero_is_no_detectable_difference():
    d = decision_module()
    # seeds 0 and 1 better by 0.0625, seed 2 worse by 0.0625 (p0 and p1 lose 0.125): the rule needs all three
    arm = {s: {p: v + (0.125 if p in ("p0", "p1") else 0.0) * (1 if s < 2 else -1) for p, v in GRPO[s].items()}
           for s in GRPO}
    result = d.decide(arm, GRPO)
    assert [round(result["per_seed"][s], 4) for s in (0, 1, 2)] == [0.0625, 0.0625, -0.0625]
    assert result["verdict"] == d.NO_DIFFERENCE == "no detectable difference from GRPO at this size"
    # better in every seed (p2 solved always, p3 a little worse) but carried by one prompt in four: a third of
    # the resamples miss p2, so the interval holds 0
    lucky = {s: {p: v + (1.0 if p == "p2" else -0.25 if p == "p3" else 0.0) for p, v in GRPO[s].items()}
             for s in GRPO}
    lucky = {s: {p: min(max(v, 0.0), 1.0) for p, v in values.items()} for s, values in lucky.items()}
    result = d.decide(lucky, GRPO)
    assert all(result["per_seed"][s] > 0 for s in (0, 1, 2))
    assert result["low"] <= 0 <= result["high"] and result["verdict"] == d.NO_DIFFERENCE
    # a seed not evaluated: no decision yet
    partial = d.decide({0: arm[0], 1: arm[1]}, GRPO)
    assert partial["per_seed"][2] is None and partial["verdict"] == "not decided yet (seed 2 not evaluated)"


def test_pass_at_k_per_prompt_from_eval_counts():
    d = decision_module()
    groups = {"a": (8, 2), "b": (8, 0), "c": (8, 8)}
    assert d.pass_at(groups, 1) == pytest.approx({"a": 0.25, "b": 0.0, "c": 1.0})
    assert d.pass_at(groups, 8) == pytest.approx({"a": 1.0, "b": 0.0, "c": 1.0})
    assert np.isclose(d.pass_at({"a": (4, 1)}, 2)["a"], 0.5)  # 1 - C(3,2)/C(4,2)


# -- the whole tournament, tiny ----------------------------------------------------------------------
def _run(args, env):
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def _snapshot(out: Path) -> tuple:
    """Every file under OUT (but the compute log) and every store's row count per table."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "compute.tsv")
    rows = {}
    for meta in out.rglob("store.json"):
        store = Store.open(meta.parent)
        for table in TABLES:
            rows[(str(meta.parent.relative_to(out)), table)] = store.query(
                f"SELECT count(*) AS n FROM {table}").to_pylist()[0]["n"]
    return files, rows


@pytest.mark.slow
def test_the_tournament_runs_every_arm_resumes_and_decides(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    env = dict(os.environ, SEEDS="0", REPLAY_TORCH_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for name in ("ENGINE", "MODEL", "N_PROMPTS", "G_OWN", "BUDGET", "STEPS", "MAX_TOKENS", "EVAL_PROMPTS",
                 "EVAL_SAMPLES", "ARMS"):
        env.pop(name, None)  # the --tiny defaults: transformers, N = 4, own G = 2, budget 4, 2 steps, ...
    first = _run(["bash", str(SCRIPT), str(out), "--tiny", str(model)], env)
    assert first.count("== ") >= 40 and "done:" in first
    for arm in ARMS:
        store = Store.open(out / f"{arm}-s0")
        # equal compute: 4 prompts x (2 own + 1) = 12 samples in every round; the tiny model solves
        # nothing, so rescue sampling takes K = 4 // 4 = 1 per negative prompt and one hint tier of 1
        per_round = store.query("SELECT round, count(*) AS n FROM rollouts GROUP BY round ORDER BY round").to_pylist()
        assert [r["n"] for r in per_round] == [12, 12, 12], arm
        steps = store.query("SELECT round, count(*) AS n FROM learn_metrics WHERE adapter_name = 'main' "
                            "GROUP BY round ORDER BY round").to_pylist()
        assert [r["n"] for r in steps] == [2, 2, 2], arm  # learn --steps 2, every round
        assert store.query("SELECT count(*) AS n FROM eval_passk WHERE round = 2 AND k = 1 AND group_by = 'all'"
                           ).to_pylist()[0]["n"] == 1
    hint = Store.open(out / "hint-s0")
    assert hint.query("SELECT count(*) AS n FROM hinted_samples").to_pylist()[0]["n"] == 8  # rounds 1, 2
    rescue = Store.open(out / "rescue-sampling-s0")
    assert rescue.query("SELECT count(*) AS n FROM sample_plans WHERE first_sample_idx = 2").to_pylist()[0]["n"] == 8
    # the base store holds round 0 alone, and every arm store started from a copy of it
    assert Store.open(out / "base").query("SELECT DISTINCT round FROM rollouts").to_pylist() == [{"round": 0}]
    log = (out / "compute.tsv").read_text().splitlines()
    assert log[0].split("\t") == ["arm", "seed", "round", "step", "wall_s", "cpu_s", "finished"]
    assert {line.split("\t")[0] for line in log[1:]} == {"base", *ARMS}

    before = _snapshot(out)
    again = _run(["bash", str(SCRIPT), str(out), "--tiny", str(model)], env)
    assert "eval" not in [line.split("] ")[0].split()[-1] for line in again.splitlines() if line.startswith("== ")]
    assert _snapshot(out) == before  # a rerun writes no file and no row

    table = _run([sys.executable, str(DECISION), str(out), "--seeds", "0"], env)
    for arm in ARMS:
        assert f"| {arm} | 0 | 0.000 | 0.000 |" in table  # pass@1 and pass@2 of a model that solves nothing
    assert "not run yet" not in table and "not evaluated yet" not in table
    decisions = [line for line in table.splitlines() if line.startswith("decision: ")]
    assert decisions == [f"decision: {arm}: no detectable difference from GRPO at this size" for arm in ARMS[1:]]
    assert "Generated tokens outside ±5 % of GRPO's (same seed and round): none" in table
    # the pre-registered seeds: seeds 1 and 2 are missing, and said to be
    partial = _run([sys.executable, str(DECISION), str(out)], env)
    assert "| lens | 1 | not run yet |" in partial and "not decided yet (seeds 1, 2 not evaluated)" in partial
