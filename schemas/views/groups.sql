-- Per round x prompt over scored samples: kind is negative (all wrong), positive (all right) or mixed.
-- Read from group_summary (written at score time), not re-aggregated from every rollout.
CREATE OR REPLACE VIEW groups AS
SELECT
    s.round, s.prompt_id,
    p.problem, p.answer AS gold_answer, p.level, p.subject,
    s.n, s.n_correct, s.pass_rate, s.mean_confidence, s.mean_wrong_confidence, s.kind
FROM group_summary s
LEFT JOIN unique_prompts p ON p.prompt_id = s.prompt_id
WHERE s.n > 0;
