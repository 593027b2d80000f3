"""Paired bootstrap confidence intervals for pass@k differences between evaluated policies.

    python examples/paired_ci.py STORE base main-r0 grpo-r0 [--ks 1 8] [--resamples 4000]
    python examples/paired_ci.py STORE main-r2 OTHER_STORE/evals/main-r2      # across two stores

`replay eval` keeps each policy's samples in STORE/evals/<adapter>-r<R>/ (base/ for the base
model), all on the same prompts with the same per-sample seeds. This resamples prompts (with
replacement, the same draw for every policy) and reports, for each policy against the first one
named, the mean per-prompt pass@k difference and its 95 % percentile interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay.core.passk import pass_at_k_groups  # noqa: E402
from replay.store import Store  # noqa: E402


def per_prompt(store_dir: Path) -> dict[str, tuple[int, int]]:
    rows = Store.open(store_dir).query("SELECT prompt_id, n, n_correct FROM groups").to_pylist()
    return {r["prompt_id"]: (r["n"], r["n_correct"]) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("policies", nargs="+", help="eval store names under STORE/evals/, or paths to eval stores "
                        "(anything with a /); the first is the reference")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--resamples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    groups = {name: per_prompt(Path(name) if "/" in name else Path(args.store) / "evals" / name)
              for name in args.policies}
    prompts = sorted(set.intersection(*(set(g) for g in groups.values())))
    draws = np.random.default_rng(args.seed).integers(0, len(prompts), (args.resamples, len(prompts)))
    reference = args.policies[0]
    print(f"{len(prompts)} prompts shared by {', '.join(args.policies)}; {args.resamples} paired resamples")
    print(f"| policy | k | pass@k | {reference} | difference | 95 % interval |\n|---|---|---|---|---|---|")
    for k in args.ks:
        values = {}
        for name, table in groups.items():
            n, c = (np.array([table[p][i] for p in prompts]) for i in (0, 1))
            values[name] = pass_at_k_groups(n, c, k)
        for name in args.policies[1:]:
            diff = values[name] - values[reference]
            low, high = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
            print(f"| {name} | {k} | {values[name].mean():.4f} | {values[reference].mean():.4f} "
                  f"| {diff.mean():+.4f} | [{low:+.4f}, {high:+.4f}] |")


if __name__ == "__main__":
    main()
