"""examples/rescue_decision.py applies the pre-registered rule to per-seed eval stores."""

import subprocess
import sys
from pathlib import Path

from replay.store import Store
from tests._store_rows import prompt_row, rollout_row, verdict_row

SCRIPT = Path(__file__).parents[1] / "examples" / "rescue_decision.py"


def eval_store(root, solved):
    """An eval store on 4 prompts x 2 samples; prompt i is solved once when solved[i]."""
    store = Store.create(root)
    prompts = [prompt_row(f"p{i}") for i in range(4)]
    store.write("prompts", prompts)
    for p, ok in zip(prompts, solved):
        store.write("rollouts", [rollout_row(0, p["prompt_id"], j) for j in range(2)], round=0)
        store.write("verdicts", [verdict_row(0, p["prompt_id"], j, ok and j == 0) for j in range(2)], round=0)


def run(store):
    return subprocess.run([sys.executable, str(SCRIPT), str(store)], capture_output=True, text=True, check=True).stdout


def test_the_rule_needs_a_win_in_every_seed(tmp_path):
    main = tmp_path / "rescue"
    Store.create(main)
    for seed in (0, 1):
        eval_store(main / "evals" / f"A-lens-s{seed}-r0-ps-1", [True, True, False, False])
        eval_store(main / "evals" / f"B-lens0-s{seed}-r0-ps-1", [True, False, False, False])
    out = run(main)
    assert "| 0 | 0.500 | 0.250 | +0.250 |" in out and "not evaluated yet" in out
    assert "decision: not yet" in out
    eval_store(main / "evals" / "A-lens-s2-r0-ps-1", [False, False, False, False])
    eval_store(main / "evals" / "B-lens0-s2-r0-ps-1", [True, False, False, False])
    out = run(main)
    assert "| 2 | 0.000 | 0.250 | -0.250 |" in out and "| False |" in out
    assert "shows no detectable effect" in out
    # per prompt the seeds' mean: A solves p0, p1 in 2 of 3 seeds (0.333 overall), B p0 in all (0.250)
    assert "| mean of 3 seeds | 0.333 | 0.250 | +0.083 |" in out
