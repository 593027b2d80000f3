"""The read side: everything that only reads a store and presents it.

inspect   canned tables for `replay inspect` and `replay status`
report    `replay report`: one self-contained HTML page (report_negatives: its failure-group panel)
plots     the report's figures (matplotlib object API)
doctor    `replay doctor`: every file and invariant checked, each problem named by path
formats   query results as a terminal table, CSV, JSON, JSON Lines, Markdown or Parquet
export    `replay export`: scored rollouts for other tools (TRL rollout_func, JSONL)
"""
