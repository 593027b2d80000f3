-- Prompts negative in one round and not negative in a later round (the first such round).
CREATE OR REPLACE VIEW rescues AS
SELECT
    a.prompt_id,
    a.round AS negative_round,
    min(b.round) AS rescued_round,
    arg_min(b.kind, b.round) AS rescued_kind,
    arg_min(b.pass_rate, b.round) AS rescued_pass_rate,
    any_value(a.problem) AS problem
FROM groups a
JOIN groups b ON b.prompt_id = a.prompt_id AND b.round > a.round
WHERE a.kind = 'negative' AND b.kind <> 'negative'
GROUP BY a.prompt_id, a.round;
