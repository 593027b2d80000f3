-- The rollouts of hint sets (`generate --prompts … --hint KIND`): sampled from a prompt with a hint in
-- it, so they describe the hinted prompt, not the plain one. They keep the plain prompt's prompt_id,
-- but groups (kind, pass rate) and learn's own groups leave them out; learn uses the right ones as
-- rescue sources (rescue_candidates, source 'hint'). Empty unless a hint set's manifest plans some.
CREATE OR REPLACE VIEW hinted_samples AS
SELECT r.round, r.prompt_id, r.sample_idx, p.hint_kind, p.hint_fraction, p.stage
FROM rollouts r
JOIN sample_plans p
    ON p.round = r.round AND p.prompt_id = r.prompt_id
   AND r.sample_idx >= p.first_sample_idx AND r.sample_idx < p.first_sample_idx + p.num_samples
WHERE p.hint_kind IS NOT NULL;
