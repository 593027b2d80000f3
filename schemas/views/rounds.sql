-- Per-round summary: sizes, accuracy, group kinds, rescues.
CREATE OR REPLACE VIEW rounds AS
WITH r AS (
    SELECT round, count(*) AS rollouts, count(DISTINCT prompt_id) AS prompts,
           avg(num_completion_tokens) AS mean_tokens, max(policy_round) AS policy_round
    FROM rollouts GROUP BY round
),
s AS (
    SELECT round, count(*) FILTER (WHERE correct IS NOT NULL) AS scored,
           avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) FILTER (WHERE correct IS NOT NULL) AS accuracy,
           avg(confidence) FILTER (WHERE correct = false) AS mean_wrong_confidence
    FROM samples GROUP BY round
),
g AS (
    SELECT round,
           count(*) FILTER (WHERE kind = 'negative') AS negative_groups,
           count(*) FILTER (WHERE kind = 'mixed') AS mixed_groups,
           count(*) FILTER (WHERE kind = 'positive') AS positive_groups,
           avg(CASE WHEN kind = 'negative' THEN 1.0 ELSE 0.0 END) AS negative_share
    FROM groups GROUP BY round
),
x AS (SELECT rescued_round AS round, count(DISTINCT prompt_id) AS rescued FROM rescues GROUP BY 1)
SELECT r.round, r.policy_round, r.prompts, r.rollouts, s.scored, s.accuracy,
       coalesce(g.negative_groups, 0) AS negative_groups,
       coalesce(g.mixed_groups, 0) AS mixed_groups,
       coalesce(g.positive_groups, 0) AS positive_groups,
       g.negative_share, coalesce(x.rescued, 0) AS rescued,
       r.mean_tokens, s.mean_wrong_confidence
FROM r
LEFT JOIN s ON s.round = r.round
LEFT JOIN g ON g.round = r.round
LEFT JOIN x ON x.round = r.round
ORDER BY r.round;
