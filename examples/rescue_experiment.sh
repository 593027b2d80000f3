#!/usr/bin/env bash
# The pre-registered rescue experiment of docs/RESULTS.md, with replay commands only.
#   bash examples/rescue_experiment.sh [OUT_DIR]      every step resumes: rerun after an interruption
# Round 0 of store rescue/ is generated and scored once; every arm trains a side adapter on exactly
# those rollouts (same lr, epochs, batch; A-D step-matched with --zero-advantage keep) and is
# evaluated on (1) the round-0 negative training prompts, G = 16 (primary outcome: rescue_eval),
# (2) 256 held-out prompts x 8. Then one multi-round pair, LENS vs step-matched GRPO, 3 rounds each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/rescue}
CFG=examples/lens_vs_grpo.toml
S="$OUT/rescue"
NEGATIVES="select prompt_id from negative_groups where round = 0"
COMMON=(--max-new-tokens 128 --temperature 1.0 --batch-size 64 --engine vllm)
RESCUE=(--prompts "$NEGATIVES" --num-samples 16 --seed 4321 "${COMMON[@]}")
HELD_OUT=(--dataset arith --split test --num-prompts 256 --levels 1,2,2,3 --num-samples 8 --seed 1234 "${COMMON[@]}")
LEARN=(--lr 1e-4 --epochs 1 --micro-batch-size 4 --grad-accum 8)
mkdir -p "$OUT"
step() { echo "== $(date -u +%H:%M:%S) $*"; "$@"; }

# --- round 0: the one data set every arm learns from ---------------------------------------------
step replay generate --store "$S" --round 0 --dataset arith --num-prompts 64 --levels 1,2,2,3 --num-samples 8 \
  --seed 0 "${COMMON[@]}"
step replay score --store "$S" --round 0

# --- arms: the primary outcome first (learn, then resample the round-0 negatives with G = 16) -------
# Ordered so that an interrupted run has answered the decision rule (A vs B, every seed) first, then
# the step-matched GRPO arm, the dose and reference arms, and only then the held-out evals.
learn_arm() {  # name seed objective flags...
  local name=$1 seed=$2 objective=$3; shift 3
  step replay learn --store "$S" --round 0 --adapter-name "$name" --objective "$objective" --seed "$seed" \
    "${LEARN[@]}" "$@"
  step replay eval --store "$S" --round 0 --adapter "$name" "${RESCUE[@]}"
}
ARMS=()
step replay eval --store "$S" --base "${RESCUE[@]}"
for seed in 0 1 2; do
  learn_arm "A-lens-s$seed" "$seed" lens --lens-alpha 0.25 --zero-advantage keep; ARMS+=("A-lens-s$seed")
  learn_arm "B-lens0-s$seed" "$seed" lens --lens-alpha 0 --zero-advantage keep; ARMS+=("B-lens0-s$seed")
done
for seed in 0 1 2; do
  learn_arm "D-grpokeep-s$seed" "$seed" grpo --zero-advantage keep; ARMS+=("D-grpokeep-s$seed")
done
learn_arm C-lens1-s0 0 lens --lens-alpha 1.0 --zero-advantage keep; ARMS+=(C-lens1-s0)
learn_arm E-grposkip-s0 0 grpo --zero-advantage skip; ARMS+=(E-grposkip-s0)
learn_arm N-nsr-s0 0 nsr; ARMS+=(N-nsr-s0)

# --- secondary: held-out pass@k of every policy ---------------------------------------------------
step replay eval --store "$S" --base "${HELD_OUT[@]}"
for name in "${ARMS[@]}"; do
  step replay eval --store "$S" --round 0 --adapter "$name" "${HELD_OUT[@]}"
done

# --- multi-round pair: A vs D, 3 rounds each in their own stores, rescue rate after every round ----
step replay round --store "$OUT/mr-lens" --config "$CFG" --set learn.zero_advantage=keep --until 2
step replay round --store "$OUT/mr-grpo" --config "$CFG" --set learn.zero_advantage=keep \
  --set learn.objective=grpo --until 2
for store in mr-lens mr-grpo; do
  for r in 0 1 2; do step replay eval --store "$OUT/$store" --round "$r" "${RESCUE[@]}"; done
done

# --- tables and the decision ---------------------------------------------------------------------
python examples/rescue_decision.py "$S"
for store in mr-lens mr-grpo; do
  replay sql --store "$OUT/$store" -f markdown "select round, adapter_name, n_prompts, round(solved_share, 4) as solved,
    round(pass_at_k, 4) as pass_at_1 from rescue_eval where k = 1 order by round"
done
