"""The pre-registered decision of docs/RESULTS.md, read from a store made by rescue_experiment.sh.

    python examples/rescue_decision.py STORE [--resamples 4000]

Primary outcome per policy: `rescue_eval.solved_share` (round-0 negative training prompts solved at
least once in 16 samples). Decision rule: negative-group learning "helps" only if arm A (LENS, α =
0.25) beats arm B (α = 0, rows kept) in every seed. Also prints, per seed, A − B with a paired
bootstrap interval over prompts, and the held-out pass@1 / pass@8 of every policy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay.store import Store  # noqa: E402

SEEDS = (0, 1, 2)


def solved_per_prompt(store: Store, adapter: str) -> dict[str, bool]:
    """prompt_id -> solved at least once, from the policy's eval store on the prompt set."""
    found = sorted((store.root / "evals").glob(f"{adapter}-r0-ps-*"))
    if not found:
        return {}
    rows = Store.open(found[-1]).query("SELECT prompt_id, n_correct > 0 AS solved FROM groups").to_pylist()
    return {r["prompt_id"]: bool(r["solved"]) for r in rows}


def paired_interval(a: dict, b: dict, resamples: int, rng) -> tuple[float, float, float]:
    ids = sorted(set(a) & set(b))
    diff = np.array([float(a[i]) - float(b[i]) for i in ids])
    draws = rng.integers(0, len(ids), size=(resamples, len(ids)))
    means = diff[draws].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_table(store: Store, first: str, second: str, resamples: int, rng) -> list:
    """Per seed: solved shares of arms `first` and `second` (name prefixes), their paired difference
    and interval; returns [first > second] per seed (None where a seed is not evaluated yet)."""
    print(f"| seed | {first} solved | {second} solved | {first} − {second} | 95 % interval | {first} > {second} |")
    print("|---|---|---|---|---|---|")
    wins, pairs = [], []
    for seed in SEEDS:
        a, b = solved_per_prompt(store, f"{first}-s{seed}"), solved_per_prompt(store, f"{second}-s{seed}")
        if not a or not b:
            print(f"| {seed} | – | – | – | not evaluated yet | – |")
            wins.append(None)
            continue
        pairs.append((a, b))
        mean, lo, hi = paired_interval(a, b, resamples, rng)
        share_a, share_b = np.mean(list(a.values())), np.mean(list(b.values()))
        wins.append(bool(share_a > share_b))
        print(f"| {seed} | {share_a:.3f} | {share_b:.3f} | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {share_a > share_b} |")
    if len(pairs) > 1:  # descriptive: per prompt, the seeds' mean of each arm, resampled by prompt
        ids = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
        pooled_a = {i: np.mean([a[i] for a, _ in pairs]) for i in ids}
        pooled_b = {i: np.mean([b[i] for _, b in pairs]) for i in ids}
        mean, lo, hi = paired_interval(pooled_a, pooled_b, resamples, rng)
        print(f"| mean of {len(pairs)} seeds | {np.mean(list(pooled_a.values())):.3f} | "
              f"{np.mean(list(pooled_b.values())):.3f} | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] | – |")
    return wins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--resamples", type=int, default=4000)
    args = parser.parse_args()
    store = Store.open(args.store)
    rng = np.random.default_rng(0)
    rescue = store.query("SELECT adapter_name, n_prompts, n_samples, k, pass_at_k, solved_share FROM rescue_eval "
                         "WHERE k = 1 ORDER BY adapter_name").to_pylist()
    print("Primary outcome per policy, on the round-0 negative training prompts P:\n")
    print("| policy | prompts | samples | solved at least once | pass@1 on P |\n|---|---|---|---|---|")
    for r in rescue:
        print(f"| {r['adapter_name']} | {r['n_prompts']} | {r['n_samples']} | {r['solved_share']:.4f} | "
              f"{r['pass_at_k']:.4f} |")
    print("\nDecision: A (LENS α = 0.25) vs B (α = 0, rows kept), paired by prompt:\n")
    wins = paired_table(store, "A-lens", "B-lens0", args.resamples, rng)
    if None in wins:
        print("\ndecision: not yet (some seeds are not evaluated)")
    else:
        print("\ndecision: negative-group learning " + ("helps (A > B in every seed)" if all(wins) else
                                                        "shows no detectable effect (A > B not in every seed)"))
    print("\nDescribed, not decided on: A vs D (GRPO, step-matched):\n")
    paired_table(store, "A-lens", "D-grpokeep", args.resamples, rng)
    held = store.query("SELECT adapter_name, round, k, pass_at_k, n_prompts FROM eval_passk WHERE group_by = 'all' "
                       "AND dataset LIKE 'arith:test:%' AND k IN (1, 8) ORDER BY adapter_name, k").to_pylist()
    print("\n| policy | k | held-out pass@k | prompts |\n|---|---|---|---|")
    for r in held:
        print(f"| {r['adapter_name']} | {r['k']} | {r['pass_at_k']:.4f} | {r['n_prompts']} |")


if __name__ == "__main__":
    main()
