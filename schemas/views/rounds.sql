-- Per-round summary: sizes, accuracy, group kinds, rescues.
CREATE OR REPLACE VIEW rounds AS
WITH r AS (
    SELECT round, CAST(sum(rollouts) AS BIGINT) AS rollouts, count(*) AS prompts,
           sum(sum_tokens) / nullif(sum(n_tokens), 0) AS mean_tokens, max(policy_round) AS policy_round
    FROM group_summary GROUP BY round
),
grp AS MATERIALIZED (
    SELECT round, prompt_id, kind, n, n_correct, mean_wrong_confidence FROM group_summary WHERE n > 0
),
s AS (
    SELECT round, sum(n) AS scored, sum(n_correct) / sum(n) AS accuracy,
           sum(mean_wrong_confidence * (n - n_correct)) / nullif(sum(n - n_correct), 0) AS mean_wrong_confidence
    FROM grp GROUP BY round
),
g AS (
    SELECT round,
           count(*) FILTER (WHERE kind = 'negative') AS negative_groups,
           count(*) FILTER (WHERE kind = 'mixed') AS mixed_groups,
           count(*) FILTER (WHERE kind = 'positive') AS positive_groups,
           avg(CASE WHEN kind = 'negative' THEN 1.0 ELSE 0.0 END) AS negative_share
    FROM grp GROUP BY round
),
x AS (
    SELECT rescued_round AS round, count(DISTINCT prompt_id) AS rescued FROM (
        SELECT a.prompt_id, min(b.round) AS rescued_round
        FROM grp a JOIN grp b ON b.prompt_id = a.prompt_id AND b.round > a.round
        WHERE a.kind = 'negative' AND b.kind <> 'negative'
        GROUP BY a.prompt_id, a.round)
    GROUP BY 1
)
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
