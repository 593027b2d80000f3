-- Prompts for which every scored sample of the round was wrong: what plain GRPO wastes.
CREATE OR REPLACE VIEW negative_groups AS
SELECT * FROM groups WHERE kind = 'negative';
