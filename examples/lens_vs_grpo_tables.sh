#!/usr/bin/env bash
# The tables of docs/RESULTS.md, as Markdown, from the stores examples/lens_vs_grpo.sh filled.
#   bash examples/lens_vs_grpo_tables.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/lens-vs-grpo}
md() { replay sql --store "$1" --format markdown "$2"; echo; }
PASSK="round(max(pass_at_k) FILTER (WHERE k = 1), 4) AS \"pass@1\",
       round(max(pass_at_k) FILTER (WHERE k = 2), 4) AS \"pass@2\",
       round(max(pass_at_k) FILTER (WHERE k = 4), 4) AS \"pass@4\",
       round(max(pass_at_k) FILTER (WHERE k = 8), 4) AS \"pass@8\""
POLICY="CASE adapter_name WHEN 'main' THEN 'lens' ELSE adapter_name END"

echo "## Same-data A/B (round 0 rollouts), held-out prompts"
md "$OUT/lens" "SELECT $POLICY AS policy, $PASSK, any_value(n_prompts) AS prompts FROM eval_passk
  WHERE group_by = 'all' AND round <= 0 GROUP BY ALL ORDER BY \"pass@1\""
echo "## Same-data A/B per level"
md "$OUT/lens" "SELECT $POLICY AS policy, group_value AS level, $PASSK, any_value(n_prompts) AS prompts
  FROM eval_passk WHERE group_by = 'level' AND round <= 0 GROUP BY ALL ORDER BY level, policy"

for store in lens grpo; do
  echo "## Multi-round: store $store, pass@k of each round's adapter (round -1: base)"
  md "$OUT/$store" "SELECT round, $PASSK FROM eval_passk
    WHERE group_by = 'all' AND adapter_name IN ('main', 'base') GROUP BY ALL ORDER BY round"
  echo "## Multi-round: store $store, pass@1 per level"
  md "$OUT/$store" "SELECT round, group_value AS level, $PASSK FROM eval_passk
    WHERE group_by = 'level' AND adapter_name IN ('main', 'base') GROUP BY ALL ORDER BY level, round"
  echo "## Training rollouts: store $store"
  md "$OUT/$store" "SELECT round, policy_round, rollouts, round(accuracy, 4) AS accuracy, negative_groups,
    mixed_groups, positive_groups, round(negative_share, 4) AS negative_share, rescued,
    round(mean_tokens, 1) AS mean_tokens, round(mean_wrong_confidence, 4) AS mean_wrong_confidence
    FROM rounds ORDER BY round"
  echo "## Stage runs: store $store (seconds; learn: samples that received gradient)"
  md "$OUT/$store" "SELECT stage, round, round(seconds, 1) AS seconds,
    CAST(counts->>'trained_samples' AS INT) AS with_gradient, CAST(counts->>'samples' AS INT) AS samples,
    CAST(counts->>'optimizer_steps' AS INT) AS steps, CAST(counts->>'tokens_written' AS INT) AS tokens
    FROM stage_runs WHERE status = 'complete' ORDER BY round, started_at"
done

echo "## Share of round-0 samples with a non-zero advantage, per objective and group kind"
md "$OUT/lens" "SELECT $POLICY AS objective, group_kind, count(*) AS samples,
  round(avg(CASE WHEN advantage <> 0 THEN 1.0 ELSE 0.0 END), 4) AS share_with_gradient,
  round(avg(advantage), 4) + 0.0 AS mean_advantage
  FROM learn_audit WHERE round = 0 GROUP BY ALL ORDER BY objective, group_kind"
