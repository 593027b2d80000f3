-- Newest pass@k per (round, adapter, dataset, slice, k).
CREATE OR REPLACE VIEW eval_passk AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY round, adapter_name, dataset, group_by, group_value, k
        ORDER BY created_at DESC) AS rn
    FROM eval)
WHERE rn = 1;
