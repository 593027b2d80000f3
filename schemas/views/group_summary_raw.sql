-- Per round x prompt, aggregated from the rows (hint sets' rows left out): every prompt with rollouts,
-- n = 0 until scored.
-- `replay score` writes this as the group_summary table; the store's `group_summary` view reads
-- those files where they are current and falls back to this (slow at scale) where they are not.
CREATE OR REPLACE VIEW group_summary_raw AS
SELECT
    round, prompt_id,
    count(*) AS rollouts,
    CAST(sum(num_completion_tokens) AS BIGINT) AS sum_tokens,
    count(num_completion_tokens) AS n_tokens,
    max(policy_round) AS policy_round,
    count(correct) AS n,
    count(*) FILTER (WHERE correct) AS n_correct,
    avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) FILTER (WHERE correct IS NOT NULL) AS pass_rate,
    avg(confidence) FILTER (WHERE correct IS NOT NULL) AS mean_confidence,
    avg(confidence) FILTER (WHERE NOT correct) AS mean_wrong_confidence,
    CASE
        WHEN count(correct) = 0 THEN NULL
        WHEN count(*) FILTER (WHERE correct) = 0 THEN 'negative'
        WHEN count(*) FILTER (WHERE correct) = count(correct) THEN 'positive'
        ELSE 'mixed'
    END AS kind
FROM samples s
ANTI JOIN hinted_samples h  -- hinted rows describe another prompt
    ON h.round = s.round AND h.prompt_id = s.prompt_id AND h.sample_idx = s.sample_idx
GROUP BY round, prompt_id;
