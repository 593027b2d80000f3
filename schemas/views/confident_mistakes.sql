-- Wrong answers, most confident first.
CREATE OR REPLACE VIEW confident_mistakes AS
SELECT round, prompt_id, sample_idx, confidence, status, gold_answer, extracted_answer,
       problem, completion_text, num_completion_tokens
FROM samples
WHERE correct = false
ORDER BY confidence DESC NULLS LAST;
