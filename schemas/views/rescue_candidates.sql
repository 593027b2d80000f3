-- Per negative group, the stored correct rollouts of its prompt that `learn --rescue replay` may put
-- into it: from any round up to the group's, any policy. source: generate (the round's own G),
-- rescue_sampling (a `generate --prompts … -G K` set, by its manifest's plan) or import; age: rounds
-- between the rollout and the group. learn's default pick: newest policy first, then rollout_id.
CREATE OR REPLACE VIEW rescue_candidates AS
SELECT
    g.round, g.prompt_id,
    s.rollout_id, s.round AS rollout_round, s.sample_idx,
    s.policy_round, r.policy_adapter,
    CASE WHEN s.engine = 'import' THEN 'import'
         WHEN EXISTS (SELECT 1 FROM sample_plans p
                      WHERE p.round = s.round AND p.prompt_id = s.prompt_id
                        AND s.sample_idx >= p.first_sample_idx
                        AND s.sample_idx < p.first_sample_idx + p.num_samples) THEN 'rescue_sampling'
         ELSE 'generate' END AS source,
    g.round - s.round AS age,
    s.num_completion_tokens, s.confidence, s.completion_text
FROM groups g
JOIN samples s ON s.prompt_id = g.prompt_id AND s.round <= g.round AND s.correct
JOIN rollouts r ON r.round = s.round AND r.prompt_id = s.prompt_id AND r.sample_idx = s.sample_idx
WHERE g.kind = 'negative';
