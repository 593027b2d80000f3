-- One row per rollout, joined with its prompt and its newest verdict (NULL columns until scored).
-- A re-score writes new verdict rows; the newest one per rollout wins here.
CREATE OR REPLACE VIEW samples AS
WITH latest_verdicts AS (
    -- newest verdict per rollout as a hash aggregate (the window sort it replaces took ~1.5x the CPU).
    -- arg_max_null, not arg_max: arg_max skips NULL values, so a NULL extracted_answer in the
    -- newest verdict would be replaced by an older verdict's value.
    SELECT round, prompt_id, sample_idx,
           arg_max_null(correct, scored_at) AS correct,
           arg_max_null(reward, scored_at) AS reward,
           arg_max_null(status, scored_at) AS status,
           arg_max_null(extracted_answer, scored_at) AS extracted_answer,
           arg_max_null(verifier_version, scored_at) AS verifier_version,
           max(scored_at) AS scored_at
    FROM verdicts
    GROUP BY round, prompt_id, sample_idx
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
