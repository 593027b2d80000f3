#!/usr/bin/env bash
# The share of round-0 negative prompts that SmolLM2-135M solves when re-sampled with each hint kind
# (docs/RESULTS.md, "Hint sets"): descriptive, one run, no claim about learning. Resumable: every
# stage skips what is stored, so rerunning the script continues where it stopped.
#   bash examples/hint_share.sh [STORE] [ENGINE]
set -euo pipefail
STORE="${1:-hint-store}"; ENGINE="${2:-transformers}"
COMMON=(--store "$STORE" --engine "$ENGINE" --max-new-tokens 128 --seed 0 -q)
replay generate --round 0 --dataset arith --num-prompts 32 -G 4 "${COMMON[@]}"
replay score --store "$STORE" --round 0 --partial -q   # --partial: a rerun may find a hint set half done
NEGATIVE="select prompt_id from negative_groups where round = 0"
for hint in prefix:0.25 prefix:0.5 prefix:0.75 answer; do
  replay generate --round 0 --prompts "$NEGATIVE" --hint "$hint" -G 4 "${COMMON[@]}"
done
replay score --store "$STORE" --round 0 -q
replay sql --store "$STORE" -f markdown "
  select h.hint_kind, h.hint_fraction, count(distinct h.prompt_id) as prompts,
         count(distinct h.prompt_id) filter (where s.correct) as solved,
         round(count(distinct h.prompt_id) filter (where s.correct) / count(distinct h.prompt_id), 3) as share,
         round(avg(case when s.correct then 1.0 else 0.0 end), 3) as pass_rate
  from hinted_samples h join samples s using (round, prompt_id, sample_idx)
  group by all order by h.hint_kind desc, h.hint_fraction"
