#!/usr/bin/env bash
# The pre-registered rescue tournament of docs/RESULTS.md, with replay commands only.
#   bash examples/rescue_tournament.sh [OUT_DIR] [--tiny MODEL_DIR]   every step resumes: rerun after an interruption
#   python examples/rescue_tournament_decision.py OUT_DIR             the tables and the decision
# Round 0 (N prompts x 8, seed 0) is generated and scored once into OUT/base; each arm and seed starts
# as a copy of it (OUT/<arm>-s<seed>, copied once, before it writes anything), then: learn round 0;
# generate round 1 (6 own samples per prompt + the arm's 2N extra), score, learn 1; the same for
# round 2; eval the round-2 adapter on held-out prompts. Arms: grpo lens rescue-sampling replay hint.
#
# Settings (environment; defaults are the pre-registered run, --tiny MODEL_DIR switches to a tiny one
# with that model and the transformers engine, still overridable):
#   ENGINE (vllm)  MODEL (smollm2-135m)  N_PROMPTS (32)  G_OWN (6)  BUDGET (2 x N_PROMPTS)  STEPS (8)
#   MAX_TOKENS (128)  EVAL_PROMPTS (256)  EVAL_SAMPLES (8)  SEEDS ("0 1 2")  ARMS (all five)
#
# Choices the design leaves to the script (docs/RESULTS.md, "How to run"):
# - rounds 1-2 sample the round-0 prompts as a prompt set (generate --prompts ROUND0 --seed S):
#   `generate --dataset arith --seed S` would draw other problems for S != 0, and the design wants the
#   same prompts every round and the seed in the sampling seeds of rounds 1-2;
# - "the round's negative prompts" are those whose 6 own samples are all wrong (negative() below): the
#   same set as negative_groups right after the own groups are scored, but unchanged once rescue
#   samples join the groups, so a rerun plans the same sets;
# - CPU seconds: the user + system time of each completed command and its children (bash `times`),
#   one line per command in OUT/compute.tsv (a rerun appends the few seconds of its skips; the
#   decision takes each step's largest line); the eval is skipped once its pass@k rows are stored.
set -euo pipefail
OUT=experiments/rescue-tournament
TINY=
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=${2:?--tiny needs MODEL_DIR}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (usage: $0 [OUT_DIR] [--tiny MODEL_DIR])" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
OUT=$(realpath -m "$OUT")
if [ -n "$TINY" ]; then
  TINY=$(realpath "$TINY")
  : "${ENGINE:=transformers}" "${MODEL:=$TINY}" "${N_PROMPTS:=4}" "${G_OWN:=2}" "${BUDGET:=4}" "${STEPS:=2}"
  : "${MAX_TOKENS:=4}" "${EVAL_PROMPTS:=4}" "${EVAL_SAMPLES:=2}"
fi
: "${ENGINE:=vllm}" "${MODEL:=smollm2-135m}" "${N_PROMPTS:=32}" "${G_OWN:=6}" "${BUDGET:=$((2 * N_PROMPTS))}"
: "${STEPS:=8}" "${MAX_TOKENS:=128}" "${EVAL_PROMPTS:=256}" "${EVAL_SAMPLES:=8}" "${SEEDS:=0 1 2}"
: "${ARMS:=grpo lens rescue-sampling replay hint}"
if (( BUDGET % N_PROMPTS )); then
  echo "BUDGET ($BUDGET) must be a multiple of N_PROMPTS ($N_PROMPTS): the G = 8 arms spend it as BUDGET/N per prompt" >&2
  exit 2
fi
G_FULL=$((G_OWN + BUDGET / N_PROMPTS))  # 6 + 2 = 8: round 0, and every round of grpo, lens, replay
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG=$OUT/compute.tsv
[ -s "$LOG" ] || printf 'arm\tseed\tround\tstep\twall_s\tcpu_s\tfinished\n' > "$LOG"

SAMPLING=(--max-new-tokens "$MAX_TOKENS" --temperature 1.0 --batch-size 64 --engine "$ENGINE")
LEARN=(--zero-advantage keep --steps "$STEPS" --lr 1e-4 --epochs 1 --lora-r 16)
HELD_OUT=(--dataset arith --split test --num-prompts "$EVAL_PROMPTS" --levels 1,2,2,3 --num-samples "$EVAL_SAMPLES"
          --seed 1234 "${SAMPLING[@]}")
ROUND0="select distinct prompt_id from groups where round = 0"
negative() {  # the round's negative prompts: all G_OWN own samples scored and wrong
  echo "select prompt_id from samples where round = $1 and sample_idx < $G_OWN group by prompt_id
        having count(correct) = $G_OWN and count(*) filter (where correct) = 0"
}
unsolved() {  # round $1's negative prompts that no hint tier below fraction $2 solved (hinted_samples)
  echo "$(negative "$1") except select h.prompt_id from hinted_samples h join samples s
        using (round, prompt_id, sample_idx) where h.round = $1 and h.hint_fraction < $2 and s.correct"
}
count() { replay sql --store "$1" -f csv "select count(*) as n from ($2)" | tail -n 1; }

children_cpu() {  # user + system seconds of the finished children, from `times` of this shell (not a subshell)
  awk 'function s(t) { gsub(",", ".", t); split(t, a, /[ms]/); return a[1] * 60 + a[2] }
       NR == 2 { printf "%.2f", s($1) + s($2) }' "$OUT/.times"
}
step() {  # ARM SEED ROUND NAME command...: print, run, log wall and CPU seconds
  local arm=$1 seed=$2 round=$3 name=$4 cpu wall
  shift 4
  echo "== $(date -u +%H:%M:%S) [$arm s$seed r$round $name] $*"
  times > "$OUT/.times"; cpu=$(children_cpu); wall=$(date +%s.%N)
  "$@"
  times > "$OUT/.times"
  cpu=$(awk -v a="$cpu" -v b="$(children_cpu)" 'BEGIN { printf "%.2f", b - a }')
  wall=$(awk -v a="$wall" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$arm" "$seed" "$round" "$name" "$wall" "$cpu" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$LOG"
}

# --- round 0: the one data set every arm starts from -----------------------------------------------
BASE=$OUT/base
step base - 0 generate replay generate --store "$BASE" --round 0 --dataset arith --num-prompts "$N_PROMPTS" \
  --levels 1,2,2,3 -G "$G_FULL" --seed 0 --model "$MODEL" "${SAMPLING[@]}"
step base - 0 score replay score --store "$BASE" --round 0

# --- one arm and seed ------------------------------------------------------------------------------
own_round() {  # ARM SEED STORE ROUND G: the round's own groups (the round-0 prompts), scored
  local arm=$1 seed=$2 store=$3 round=$4 g=$5
  step "$arm" "$seed" "$round" generate replay generate --store "$store" --round "$round" --prompts "$ROUND0" \
    -G "$g" --seed "$seed" --model "$MODEL" "${SAMPLING[@]}"
  step "$arm" "$seed" "$round" score replay score --store "$store" --round "$round"
}

rescue_sampling() {  # K = floor(BUDGET / n_neg) more samples for each negative prompt
  local seed=$1 store=$2 round=$3 n k
  n=$(count "$store" "$(negative "$round")")
  if (( n == 0 )); then echo "   round $round: no negative prompt, nothing to re-sample"; return; fi
  k=$((BUDGET / n))
  if (( k == 0 )); then echo "   round $round: $n negative prompts, more than the budget of $BUDGET"; return; fi
  if (( n == N_PROMPTS && k == G_OWN )); then  # the same prompt set and K as the own groups: one manifest
    echo "every prompt negative and K = G_OWN = $k: the rescue set would reuse the own groups' manifest" >&2
    exit 1
  fi
  step rescue-sampling "$seed" "$round" rescue-sampling replay generate --store "$store" --round "$round" \
    --prompts "$(negative "$round")" -G "$k" --seed "$seed" --model "$MODEL" "${SAMPLING[@]}"
  step rescue-sampling "$seed" "$round" score-rescue replay score --store "$store" --round "$round"
}

hint_tiers() {  # prefix 0.25 -> 0.5 -> 0.75 on the prompts still unsolved, K_t = min(8, left / prompts)
  local seed=$1 store=$2 round=$3 left=$BUDGET fraction n k
  for fraction in 0.25 0.5 0.75; do
    n=$(count "$store" "$(unsolved "$round" "$fraction")")
    if (( n == 0 || left < n )); then
      echo "   round $round: hint tiers stop at prefix:$fraction ($n prompts unsolved, $left samples left)"
      return
    fi
    k=$((left / n))
    if (( k > 8 )); then k=8; fi
    step hint "$seed" "$round" "hint-$fraction" replay generate --store "$store" --round "$round" \
      --prompts "$(unsolved "$round" "$fraction")" --hint "prefix:$fraction" -G "$k" --seed "$seed" \
      --model "$MODEL" "${SAMPLING[@]}"
    step hint "$seed" "$round" "score-hint-$fraction" replay score --store "$store" --round "$round"
    left=$((left - n * k))
  done
}

run_arm() {  # ARM SEED
  local arm=$1 seed=$2 store=$OUT/$1-s$2 round done
  local -a objective=(--objective grpo)
  case $arm in
    grpo|rescue-sampling) ;;
    lens) objective=(--objective lens --lens-alpha 0.25) ;;
    replay) objective+=(--rescue replay --rescue-max 2 --behaviour-correction tis --behaviour-cap 2) ;;
    hint) objective+=(--rescue replay --hinted-as rescue) ;;
    *) echo "unknown arm $arm (arms: grpo lens rescue-sampling replay hint)" >&2; exit 2 ;;
  esac
  if [ ! -e "$store" ]; then  # a copy of round 0 only, made whole before the arm writes
    rm -rf "$store.copying"
    cp -a "$BASE" "$store.copying"
    mv "$store.copying" "$store"
  fi
  for round in 0 1 2; do
    if (( round > 0 )); then
      case $arm in
        rescue-sampling) own_round "$arm" "$seed" "$store" "$round" "$G_OWN"
                         rescue_sampling "$seed" "$store" "$round" ;;
        hint) own_round "$arm" "$seed" "$store" "$round" "$G_OWN"
              hint_tiers "$seed" "$store" "$round" ;;
        *) own_round "$arm" "$seed" "$store" "$round" "$G_FULL" ;;
      esac
    fi
    step "$arm" "$seed" "$round" learn replay learn --store "$store" --round "$round" "${objective[@]}" \
      --seed "$seed" "${LEARN[@]}"
  done
  done=$(count "$store" "select 1 from eval_passk where round = 2 and adapter_name = 'main'
                         and dataset = 'arith:test:$EVAL_PROMPTS' and k = 1")
  if (( done == 0 )); then
    step "$arm" "$seed" eval eval replay eval --store "$store" --round 2 --adapter main "${HELD_OUT[@]}"
  fi
}

# seed 0 of every arm first, then seed 1, then seed 2: an interrupted run has whole seeds to compare
for seed in $SEEDS; do
  for arm in $ARMS; do
    run_arm "$arm" "$seed"
  done
done
rm -f "$OUT/.times"
echo "== $(date -u +%H:%M:%S) done: python examples/rescue_tournament_decision.py $OUT"
