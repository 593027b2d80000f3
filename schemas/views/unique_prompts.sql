-- One row per prompt_id: the first registered (a prompt set registered twice adds no duplicates).
-- A GROUP BY, not DISTINCT ON: DuckDB then knows prompt_id is unique here and drops the LEFT JOIN
-- of `groups` and `samples` to this view from queries that use no prompt column (counts of groups
-- by kind: 0.3 s -> 0.03 s at 10 M rollouts). The struct keeps each row's columns together.
CREATE OR REPLACE VIEW unique_prompts AS
SELECT prompt_id, p.first.source AS source, p.first.split AS split, p.first.problem AS problem,
       p.first.answer AS answer, p.first.level AS level, p.first.subject AS subject,
       p.first.unique_id AS unique_id, p.first.created_at AS created_at
FROM (
    SELECT prompt_id,
           arg_min({'source': source, 'split': split, 'problem': problem, 'answer': answer, 'level': level,
                    'subject': subject, 'unique_id': unique_id, 'created_at': created_at}, created_at) AS first
    FROM prompts
    GROUP BY prompt_id
) p;
