-- Per negative group, the stored correct rollouts of its prompt that `learn --rescue replay` may put
-- into it: from any round up to the group's, any policy. source: generate (the round's own G),
-- rescue_sampling (a `generate --prompts … -G K` set, by its manifest's plan), hint (a hint set:
-- hint_kind, hint_fraction; sampled from the hinted prompt) or import; age: rounds
-- between the rollout and the group. learn's default pick: newest policy first, then rollout_id.
-- Only the groups that group_summary says hold a right answer are read row by row (sub-second at 10 M).
CREATE OR REPLACE VIEW rescue_candidates AS
WITH negative AS (
    SELECT round, prompt_id FROM group_summary WHERE kind = 'negative'
),
solved AS (  -- groups with a right answer of their own, and groups with a hint set
    SELECT round, prompt_id FROM group_summary WHERE n_correct > 0
    UNION
    SELECT round, prompt_id FROM sample_plans WHERE hint_kind IS NOT NULL
),
pairs AS (  -- (negative group, an earlier-or-same round that may hold a right answer to its prompt)
    SELECT n.round, n.prompt_id, s.round AS rollout_round
    FROM negative n
    JOIN solved s ON s.prompt_id = n.prompt_id AND s.round <= n.round
),
right_answers AS (  -- the newest verdict of each rollout of those groups says right
    SELECT v.round, v.prompt_id, v.sample_idx
    FROM verdicts v
    SEMI JOIN (SELECT DISTINCT rollout_round, prompt_id FROM pairs) p
        ON v.round = p.rollout_round AND v.prompt_id = p.prompt_id
    GROUP BY v.round, v.prompt_id, v.sample_idx
    HAVING arg_max_null(v.correct, v.scored_at)
)
SELECT
    p.round, p.prompt_id,
    r.rollout_id, r.round AS rollout_round, r.sample_idx,
    r.policy_round, r.policy_adapter,
    CASE WHEN h.hint_kind IS NOT NULL THEN 'hint'
         WHEN r.engine = 'import' THEN 'import'
         WHEN EXISTS (SELECT 1 FROM sample_plans sp
                      WHERE sp.round = r.round AND sp.prompt_id = r.prompt_id
                        AND r.sample_idx >= sp.first_sample_idx
                        AND r.sample_idx < sp.first_sample_idx + sp.num_samples) THEN 'rescue_sampling'
         ELSE 'generate' END AS source,
    h.hint_kind, h.hint_fraction,
    p.round - r.round AS age,
    r.num_completion_tokens,
    exp(r.sum_logprob / greatest(r.num_completion_tokens, 1)) AS confidence
FROM pairs p
JOIN right_answers a ON a.round = p.rollout_round AND a.prompt_id = p.prompt_id
JOIN rollouts r ON r.round = a.round AND r.prompt_id = a.prompt_id AND r.sample_idx = a.sample_idx
LEFT JOIN hinted_samples h ON h.round = r.round AND h.prompt_id = r.prompt_id AND h.sample_idx = r.sample_idx;
