#!/usr/bin/env bash
# LENS vs GRPO vs NSR vs W-REINFORCE, with replay commands only (docs/RESULTS.md has the results).
#   bash examples/lens_vs_grpo.sh [OUT_DIR]       every step resumes: rerun after an interruption
# 1. Same-data A/B: round 0 of store lens/ is generated and scored once; one adapter per objective
#    is trained from exactly those rollouts (same seed, lr, epochs) and each is evaluated, with the
#    base model, on the same held-out prompts and the same per-sample seeds.
# 2. Multi-round: 3 rounds of lens (store lens/) and of grpo (store grpo/), pass@k after each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/lens-vs-grpo}
CFG=examples/lens_vs_grpo.toml
EVAL=(--dataset arith --split test --num-prompts 128 --levels 1,2,2,3 --num-samples 8
      --max-new-tokens 128 --temperature 1.0 --seed 1234 --batch-size 64 --engine vllm)
mkdir -p "$OUT"
step() { echo "== $(date -u +%H:%M:%S) $*"; "$@"; }
evaluate() {  # store round adapter; a rerun finds the samples stored and only recounts pass@k
  local flags=(--round "$2" --adapter "$3"); [ "$2" = -1 ] && flags=(--base)
  step replay eval --store "$OUT/$1" "${flags[@]}" "${EVAL[@]}"
}

# --- 1. same-data A/B on round 0 --------------------------------------------------------------
step replay round --store "$OUT/lens" --config "$CFG" --until 0               # generate, score, learn lens
for objective in grpo nsr w_reinforce; do                                      # same rollouts, other objectives
  step replay learn --store "$OUT/lens" --round 0 --objective "$objective" --adapter-name "$objective" \
    --lr 1e-4 --epochs 1 --micro-batch-size 4 --grad-accum 8 --seed 0
done
evaluate lens -1 base
for adapter in main grpo nsr w_reinforce; do evaluate lens 0 "$adapter"; done

# --- 2. multi-round: lens and grpo, 3 rounds each -----------------------------------------------
step replay round --store "$OUT/lens" --config "$CFG" --until 2               # rounds 1 and 2
step replay round --store "$OUT/grpo" --config "$CFG" --set learn.objective=grpo --until 2
for r in 1 2; do evaluate lens "$r" main; done
for r in 0 1 2; do evaluate grpo "$r" main; done

# --- report --------------------------------------------------------------------------------------
step replay report --store "$OUT/lens" --compare "$OUT/grpo" --out "$OUT/report"
replay sql --store "$OUT/lens" "select adapter_name, round, k, round(pass_at_k, 4) as pass_at_k from eval_passk
  where group_by = 'all' order by adapter_name, round, k"
# paired bootstrap intervals: A/B objectives against the base model, then lens vs grpo per round
python examples/paired_ci.py "$OUT/lens" base main-r0 grpo-r0 nsr-r0 w_reinforce-r0
for r in 0 1 2; do python examples/paired_ci.py "$OUT/lens" "$OUT/grpo/evals/main-r$r" "main-r$r"; done
