"""examples/paired_ci.py: paired bootstrap over eval stores, by name under STORE/evals/ or by path."""

import subprocess
import sys
from pathlib import Path

from replay.store import Store
from tests._store_rows import prompt_row, rollout_row, verdict_row

SCRIPT = Path(__file__).parents[1] / "examples" / "paired_ci.py"
G = 4


def eval_store(path: Path, correct_per_prompt: list[int]) -> None:
    store = Store.create(path)
    prompts = [prompt_row(f"{i}+1?", str(i + 1)) for i in range(len(correct_per_prompt))]
    store.write("prompts", prompts)
    store.write("rollouts", [rollout_row(0, p["prompt_id"], s) for p in prompts for s in range(G)], round=0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], s, s < c)
                             for p, c in zip(prompts, correct_per_prompt) for s in range(G)], round=0)


def test_differences_are_paired_by_prompt(tmp_path):
    root = tmp_path / "store"
    eval_store(root / "evals" / "base", [0, 1, 2, 3])  # pass@1 per prompt 0, .25, .5, .75 -> mean .375
    eval_store(tmp_path / "other", [1, 2, 3, 4])  # each prompt exactly +.25 -> every resample +.25
    out = subprocess.run([sys.executable, SCRIPT, root, "base", tmp_path / "other", "--ks", "1", "--resamples", "200"],
                         capture_output=True, text=True, check=True).stdout
    assert "4 prompts shared" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {tmp_path / 'other'} | 1 |"))
    assert "| 0.6250 | 0.3750 | +0.2500 | [+0.2500, +0.2500] |" in row, row
