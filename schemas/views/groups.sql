-- Per round x prompt over scored samples: kind is negative (all wrong), positive (all right) or mixed.
CREATE OR REPLACE VIEW groups AS
SELECT
    round, prompt_id,
    any_value(problem) AS problem,
    any_value(gold_answer) AS gold_answer,
    any_value(level) AS level,
    any_value(subject) AS subject,
    count(*) AS n,
    count(*) FILTER (WHERE correct) AS n_correct,
    avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) AS pass_rate,
    avg(confidence) AS mean_confidence,
    avg(confidence) FILTER (WHERE NOT correct) AS mean_wrong_confidence,
    CASE
        WHEN count(*) FILTER (WHERE correct) = 0 THEN 'negative'
        WHEN count(*) FILTER (WHERE correct) = count(*) THEN 'positive'
        ELSE 'mixed'
    END AS kind
FROM samples
WHERE correct IS NOT NULL
GROUP BY round, prompt_id;
