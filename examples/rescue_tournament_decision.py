"""The pre-registered decision of the rescue tournament (docs/RESULTS.md), read from a run of
examples/rescue_tournament.sh.

    python examples/rescue_tournament_decision.py OUT_DIR [--resamples 4000] [--seeds 0 1 2]

Primary outcome: held-out pass@1 of each arm's round-2 adapter (OUT_DIR/<arm>-s<seed>/evals/main-r2/,
the same prompts and per-sample seeds for every arm), paired by prompt against the GRPO arm of the
same seed. Decision rule: an arm beats GRPO only if its pass@1 − GRPO's is above 0 in every seed AND
the pooled paired 95 % interval (bootstrap over prompts of the difference averaged over the seeds)
excludes 0; otherwise "no detectable difference from GRPO at this size". --seeds other than 0 1 2
only serves tests and partial looks: the pre-registered rule is on seeds 0, 1 and 2.

Also printed, described only: pass@8, and per round the negative groups, generated tokens (rollouts),
trained tokens (learn_metrics.tokens), optimizer steps, replayed rows and CPU seconds (the largest
logged run of each step in OUT_DIR/compute.tsv); an arm whose generated tokens in a round differ from
GRPO's (same seed) by more than 5 % is listed as a deviation. What is missing reads "not run yet".
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replay.core.passk import pass_at_k_groups  # noqa: E402
from replay.store import Store  # noqa: E402

ARMS = ("grpo", "lens", "rescue-sampling", "replay", "hint")
REFERENCE = "grpo"
SEEDS = (0, 1, 2)
ROUNDS = (0, 1, 2)
TOLERANCE = 0.05  # generated tokens per arm and round vs GRPO's
BEATS = "beats GRPO"
NO_DIFFERENCE = "no detectable difference from GRPO at this size"


def eval_groups(store_dir: Path) -> dict[str, tuple[int, int]]:
    """prompt_id -> (samples, correct) of the round-2 adapter's held-out eval; {} if not evaluated."""
    sub = store_dir / "evals" / "main-r2"
    if not (sub / "store.json").exists():
        return {}
    rows = Store.open(sub).query("SELECT prompt_id, n, n_correct FROM groups").to_pylist()
    return {r["prompt_id"]: (r["n"], r["n_correct"]) for r in rows if r["n"]}


def pass_at(groups: dict[str, tuple[int, int]], k: int) -> dict[str, float]:
    ids = sorted(groups)
    n, c = (np.array([groups[i][j] for i in ids]) for j in (0, 1))
    return dict(zip(ids, pass_at_k_groups(n, c, k).tolist())) if ids else {}


def decide(arm: dict[int, dict[str, float]], grpo: dict[int, dict[str, float]], seeds=SEEDS,
           resamples: int = 4000, rng=None) -> dict:
    """The rule on per-prompt pass@1 (seed -> prompt_id -> pass@1) of an arm and of GRPO. Returns the
    difference per seed (None where either is missing), the pooled mean difference and its 95 %
    bootstrap interval over prompts (the per-prompt difference averaged over the seeds), and the
    verdict: BEATS, NO_DIFFERENCE, or "not decided yet" while a seed is missing."""
    rng = rng if rng is not None else np.random.default_rng(0)
    per_seed = {}
    for seed in seeds:
        a, b = arm.get(seed) or {}, grpo.get(seed) or {}
        ids = sorted(set(a) & set(b))
        per_seed[seed] = float(np.mean([a[i] - b[i] for i in ids])) if ids else None
    present = [s for s in seeds if per_seed[s] is not None]
    out = {"per_seed": per_seed, "mean": None, "low": None, "high": None}
    if present:
        ids = sorted(set.intersection(*(set(arm[s]) & set(grpo[s]) for s in present)))
        diff = np.array([np.mean([arm[s][i] - grpo[s][i] for s in present]) for i in ids])
        means = diff[rng.integers(0, len(ids), size=(resamples, len(ids)))].mean(axis=1)
        out |= {"mean": float(diff.mean()), "low": float(np.percentile(means, 2.5)),
                "high": float(np.percentile(means, 97.5))}
    missing = [s for s in seeds if per_seed[s] is None]
    if missing:
        out["verdict"] = (f"not decided yet (seed{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(map(str, missing))} not evaluated)")
    elif all(per_seed[s] > 0 for s in seeds) and (out["low"] > 0 or out["high"] < 0):
        out["verdict"] = BEATS
    else:
        out["verdict"] = NO_DIFFERENCE
    return out


def per_round(store: Store, sql: str) -> dict[int, float]:
    return {r["round"]: r["v"] for r in store.query(sql).to_pylist()}


def compute_log(out: Path) -> dict[tuple[str, str, str], float]:
    """(arm, seed, round) -> CPU seconds: per step its largest logged run (reruns log their skips too)."""
    path = out / "compute.tsv"
    steps: dict[tuple[str, str, str, str], float] = {}
    if path.exists():
        with path.open() as f:
            for row in csv.DictReader(f, delimiter="\t"):
                key = (row["arm"], row["seed"], row["round"], row["step"])
                steps[key] = max(steps.get(key, 0.0), float(row["cpu_s"]))
    totals: dict[tuple[str, str, str], float] = {}
    for (arm, seed, round_, _), seconds in steps.items():
        totals[(arm, seed, round_)] = totals.get((arm, seed, round_), 0.0) + seconds
    return totals


def arm_facts(store_dir: Path) -> dict:
    """Per round: negative groups, generated and trained tokens, optimizer steps, replayed rows."""
    store = Store.open(store_dir)
    return {
        "negative": per_round(store, "SELECT round, count(*) AS v FROM negative_groups GROUP BY round"),
        "generated": per_round(store, "SELECT round, sum(num_completion_tokens) AS v FROM rollouts GROUP BY round"),
        "trained": per_round(store, "SELECT round, sum(tokens) AS v FROM learn_metrics WHERE adapter_name = 'main' "
                                    "GROUP BY round"),
        "steps": per_round(store, "SELECT round, count(*) AS v FROM learn_metrics WHERE adapter_name = 'main' "
                                  "GROUP BY round"),
        "replayed": per_round(store, "SELECT round, sum(replayed_rows) AS v FROM learn_metrics "
                                     "WHERE adapter_name = 'main' GROUP BY round"),
    }


def rounds(values: dict[int, float], fmt="{:.0f}") -> str:
    return " / ".join("–" if values.get(r) is None else fmt.format(values[r]) for r in ROUNDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the OUT_DIR of examples/rescue_tournament.sh")
    parser.add_argument("--resamples", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = parser.parse_args()
    out = Path(args.out)
    seeds = tuple(args.seeds)
    cpu = compute_log(out)
    evals = {(arm, s): eval_groups(out / f"{arm}-s{s}") for arm in ARMS for s in seeds}
    sizes = [n for g in evals.values() for n, _ in g.values()]
    k_high = min(8, min(sizes)) if sizes else 8  # pass@8 (pass@n when the eval drew fewer samples)
    pass1 = {key: pass_at(g, 1) for key, g in evals.items()}
    passk = {key: pass_at(g, k_high) for key, g in evals.items()}

    print(f"Held-out pass@1 and pass@{k_high} of the round-2 adapter, and per round (r0 / r1 / r2) what each arm "
          f"spent (CPU s of round R: its generation, scoring and learn; round 0's generation is shared):\n")
    print(f"| arm | seed | pass@1 | pass@{k_high} | pass@1 − GRPO | negative groups | generated tokens | "
          f"trained tokens | optimizer steps | replayed rows | CPU s | eval CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    facts, deviations = {}, []
    for arm in ARMS:
        for s in seeds:
            store_dir = out / f"{arm}-s{s}"
            if not (store_dir / "store.json").exists():
                print(f"| {arm} | {s} | not run yet | | | | | | | | | |")
                continue
            f = facts[(arm, s)] = arm_facts(store_dir)
            p1, pk, ref = pass1[(arm, s)], passk[(arm, s)], pass1[(REFERENCE, s)]
            if p1:
                shared = sorted(set(p1) & set(ref))
                delta = ("–" if arm == REFERENCE else
                         f"{np.mean([p1[i] - ref[i] for i in shared]):+.3f}" if shared else "GRPO not evaluated yet")
                scores = f"{np.mean(list(p1.values())):.3f} | {np.mean(list(pk.values())):.3f} | {delta}"
            else:
                scores = "not evaluated yet | | "
            seconds = {r: cpu.get((arm, str(s), str(r))) for r in ROUNDS}
            eval_cpu = cpu.get((arm, str(s), "eval"))
            print(f"| {arm} | {s} | {scores} | {rounds(f['negative'])} | {rounds(f['generated'])} | "
                  f"{rounds(f['trained'])} | {rounds(f['steps'])} | {rounds(f['replayed'])} | "
                  f"{rounds(seconds)} | {'–' if eval_cpu is None else f'{eval_cpu:.0f}'} |")
    base = [cpu.get(("base", "-", "0"))]
    if base[0] is not None:
        print(f"\nRound 0 (shared by every arm: generated once into base/): {base[0]:.0f} CPU s.")

    for (arm, s), f in facts.items():  # equal compute, checked not forced
        ref = facts.get((REFERENCE, s))
        for r in (1, 2):
            if arm == REFERENCE or not ref or not ref["generated"].get(r) or f["generated"].get(r) is None:
                continue
            ratio = f["generated"][r] / ref["generated"][r] - 1
            if abs(ratio) > TOLERANCE:
                deviations.append(f"- {arm} seed {s} round {r}: {f['generated'][r]:.0f} generated tokens, "
                                  f"{ratio:+.1%} from GRPO's {ref['generated'][r]:.0f}")
    print("\nGenerated tokens outside ±5 % of GRPO's (same seed and round): "
          + ("none" if not deviations else "\n" + "\n".join(deviations)))

    reference = {s: pass1[(REFERENCE, s)] for s in seeds}
    print(f"\nThe decision: pass@1 − GRPO per seed, paired by prompt; pooled over seeds {', '.join(map(str, seeds))} "
          f"with {args.resamples} bootstrap resamples of the prompts:\n")
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled | 95 % interval | decision |")
    print("|---|" + "---|" * len(seeds) + "---|---|---|")
    lines = []
    for arm in ARMS:
        if arm == REFERENCE:
            continue
        # the same draws of prompts for every arm, as paired_ci.py
        result = decide({s: pass1[(arm, s)] for s in seeds}, reference, seeds, args.resamples,
                        np.random.default_rng(0))
        diffs = " | ".join("not run yet" if result["per_seed"][s] is None else f"{result['per_seed'][s]:+.3f}"
                           for s in seeds)
        pooled = ("– | –" if result["mean"] is None else
                  f"{result['mean']:+.3f} | [{result['low']:+.3f}, {result['high']:+.3f}]")
        print(f"| {arm} | {diffs} | {pooled} | {result['verdict']} |")
        lines.append(f"decision: {arm}: {result['verdict']}")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
