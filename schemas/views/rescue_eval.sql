-- Rescue, measured: per evaluated policy and prompt set chosen by SQL (`replay eval --prompts`,
-- e.g. the negative groups of round 0), the unbiased pass@k on the set and `solved_share`, the
-- share of the set's prompts the policy solves at least once in its n samples (pass@k at k = n).
CREATE OR REPLACE VIEW rescue_eval AS
SELECT e.round, e.adapter_name, s.prompt_set_id, s.sql AS prompt_set_sql, e.n_prompts, e.n_samples, e.k,
       e.pass_at_k,
       max(e.pass_at_k) FILTER (WHERE e.k = e.n_samples)
           OVER (PARTITION BY e.round, e.adapter_name, e.dataset) AS solved_share,
       e.created_at
FROM eval_passk e
JOIN prompt_sets s ON e.dataset = 'prompts:' || s.prompt_set_id
WHERE e.group_by = 'all';
