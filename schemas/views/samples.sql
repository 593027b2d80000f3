-- One row per rollout, joined with its prompt and its newest verdict (NULL columns until scored).
-- A re-score writes new verdict rows; the newest one per rollout wins here.
CREATE OR REPLACE VIEW samples AS
WITH latest_verdicts AS (
    SELECT * EXCLUDE (rn) FROM (
        SELECT *, row_number() OVER (
            PARTITION BY round, prompt_id, sample_idx
            ORDER BY scored_at DESC, verifier_version DESC) AS rn
        FROM verdicts)
    WHERE rn = 1
),
unique_prompts AS (
    SELECT DISTINCT ON (prompt_id) * FROM prompts ORDER BY prompt_id, created_at
)
SELECT
    r.round, r.prompt_id, r.sample_idx, r.rollout_id,
    p.source, p.split, p.problem, p.answer AS gold_answer, p.level, p.subject,
    r.completion_text, r.finish_reason, r.num_completion_tokens, r.sum_logprob,
    -- length-normalised confidence c = exp(mean token logprob), as LENS uses it
    exp(r.sum_logprob / greatest(r.num_completion_tokens, 1)) AS confidence,
    r.policy_round, r.engine, r.temperature, r.logprobs_mode,
    v.correct, v.reward, v.status, v.extracted_answer, v.verifier_version, v.scored_at
FROM rollouts r
LEFT JOIN latest_verdicts v
    ON v.round = r.round AND v.prompt_id = r.prompt_id AND v.sample_idx = r.sample_idx
LEFT JOIN unique_prompts p ON p.prompt_id = r.prompt_id;
