-- One row per prompt_id: the first registered (a prompt set registered twice adds no duplicates).
CREATE OR REPLACE VIEW unique_prompts AS
SELECT DISTINCT ON (prompt_id) * FROM prompts ORDER BY prompt_id, created_at;
