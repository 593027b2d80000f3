-- Per round and hint (kind, fraction): the prompts a hint set tried, how many it solved with the
-- hint, and how many the next round's own samples (the plain prompt, sampled by the next policy)
-- solved without it.
CREATE OR REPLACE VIEW hint_outcomes AS
WITH tried AS (
    SELECT h.round, h.hint_kind, h.hint_fraction, h.prompt_id, bool_or(coalesce(s.correct, false)) AS solved
    FROM hinted_samples h
    JOIN samples s ON s.round = h.round AND s.prompt_id = h.prompt_id AND s.sample_idx = h.sample_idx
    GROUP BY h.round, h.hint_kind, h.hint_fraction, h.prompt_id
)
SELECT
    t.round, t.hint_kind, t.hint_fraction,
    count(*) AS prompts_tried,
    count(*) FILTER (WHERE t.solved) AS solved_with_hint,
    count(g.prompt_id) AS sampled_next_round,
    count(*) FILTER (WHERE g.n_correct > 0) AS solved_next_round_without_hint
FROM tried t
LEFT JOIN groups g ON g.round = t.round + 1 AND g.prompt_id = t.prompt_id
GROUP BY t.round, t.hint_kind, t.hint_fraction
ORDER BY t.round, t.hint_kind, t.hint_fraction;
