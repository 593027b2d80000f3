"""The attack corpus: user SQL tries to write, read outside the store, or read the settings.

Every attempt runs through the CLI in a working directory of its own, next to a canary file
outside the store, a canary in `<cwd>/.tmp/` (DuckDB's default temp directory) and a store with
rows. Each must leave every file byte-identical, create none, and print none of the secrets.
"""

import hashlib
import os

import pytest

from replay.store import Store
from tests._cli import invoke
from tests._store_rows import prompt_row, rollout_row, verdict_row

CANARY = "CANARY-7f3a-outside-the-store"
TEMP_CANARY = "CANARY-temp-dir-7f3a"
PASSWD = "root:x:0:0"

# {S} the store, {O} a directory outside it holding secret.txt; relative paths resolve in the cwd
TRICK = "explain /* analyze select 1 --*/ analyze "
REFUSED = [
    # the reproductions from the issue, as written
    TRICK + "copy (select 1 as x) to '{S}/pwn.csv'",
    TRICK + "copy (select round, prompt_id, sample_idx, true as correct from verdicts) "
            "to '{S}/verdicts/round=0/part-poison.parquet' (format parquet)",
    TRICK + "copy (select 1 as x) to '{S}/store.json'",
    TRICK + "create table t as select 1",
    "select * from glob('.tmp/*')",
    "select * from read_text('.tmp/secret.txt')",
    "select current_setting('allowed_directories')",
    "select * from duckdb_settings()",
    # EXPLAIN forms
    "explain analyze copy (select 1) to '{S}/x.csv'",
    "EXPLAIN copy (select 1) to '{S}/x.csv'",
    "explain analyse create table t as select 1",
    "EXPLAIN/**/ANALYZE/**/COPY (SELECT 1) TO '{S}/x.csv'",
    "explain /* /* nested */ analyze */ copy (select 1) to '{S}/x.csv'",
    "explain -- analyze select 1\n analyze copy (select 1) to '{S}/x.csv'",
    "EXPLAIN (FORMAT json) COPY (SELECT 1) TO '{S}/x.csv'",
    "explain analyze select * from read_text('{O}/secret.txt')",
    "explain analyze select current_setting('temp_directory')",
    # statements of every writing kind
    "COPY (SELECT 1) TO '{S}/x.csv'",
    "COPY verdicts TO 'pwn.csv'",
    "COPY verdicts FROM '{S}/store.json'",
    "EXPORT DATABASE '{S}/dump'",
    "ATTACH '{S}/evil.duckdb' AS evil",
    "ATTACH ':memory:' AS m",
    "DETACH memory",
    "USE memory",
    "INSTALL httpfs",
    "FORCE INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{S}/evil.duckdb_extension'",
    "SET enable_external_access = true",
    "SET GLOBAL lock_configuration = false",
    "RESET allowed_directories",
    "PRAGMA enable_profiling = 'json'",
    "CALL pragma_version()",
    "CREATE MACRO m(x) AS x",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE OR REPLACE VIEW samples AS SELECT 1",
    "INSERT INTO verdicts SELECT * FROM verdicts",
    "UPDATE verdicts SET correct = true",
    "DELETE FROM verdicts",
    "DROP VIEW samples",
    "ALTER VIEW samples RENAME TO s2",
    "PREPARE p AS COPY (SELECT 1) TO '{S}/x.csv'",
    "EXECUTE p",
    "CHECKPOINT",
    "VACUUM",
    "BEGIN TRANSACTION",
    "COMMENT ON VIEW samples IS 'x'",
    "PIVOT verdicts ON status USING count(*)",
    # several statements, comments, quoting
    "SELECT 1; COPY (SELECT 1) TO '{S}/x.csv'",
    "SELECT 1 /* ; */; COPY (SELECT 1) TO 'pwn.csv'",
    "select $$a$$; copy (select 1) to 'pwn.csv'",
    "select $x$ ' $x$; copy (select 1) to 'pwn.csv' --",
    "select 'it''s'; attach ':memory:' as m",
    "select 1 as \"ü\"; copy (select 1) to '{S}/ünïcødé.csv'",
    "\ufeffCOPY (SELECT 1) TO 'pwn.csv'",
    # reading outside the store
    "select * from read_text('/etc/passwd')",
    "select * from read_blob('/etc/passwd')",
    "select * from read_csv('/etc/passwd')",
    "select * from glob('/etc/*')",
    "select * from read_text('/proc/self/environ')",
    "select * from read_text('file:///etc/passwd')",
    "select * from read_text('~/.bashrc')",
    "select * from read_text('{O}/secret.txt')",
    "select * from read_text('{S}/../outside/secret.txt')",
    "select * from read_text('{S}/rollouts/round=0/../../../outside/secret.txt')",
    "select * from read_text('outside/secret.txt')",
    "select * from read_parquet(['{S}/rollouts/round=0/*.parquet', '/etc/passwd'])",
    "select * from read_json('/etc/os-release')",
    "select content from read_text('/etc/passwd') union all select 'x'",
    "with t as (select * from read_text('/etc/passwd')) select * from t",
    # SQL from a string, settings, environment, secrets
    "select * from query('select * from read_text(''/etc/passwd'')')",
    "select * from query('select current_setting(''temp_directory'')')",
    "select * from query_table('verdicts')",
    "select * from json_execute_serialized_sql(json_serialize_sql('select 1'))",
    "select current_setting('temp_directory')",
    "select system.main.current_setting('allowed_directories')",
    "select * from pg_settings",
    "select * from pg_catalog.pg_settings",
    'select * from "PG_SETTINGS"',
    "summarize select current_setting('allowed_directories')",
    "describe select current_setting('allowed_directories')",
    "select getenv('HOME')",
    "select * from duckdb_secrets()",
    "select * from which_secret('s3://b/k', 's3')",
    "select * from duckdb_temporary_files()",
    # settings through SHOW (issue 24 §3), as written, then in every position a query can hold one
    "SHOW allowed_directories",
    "SHOW temp_directory",
    "SHOW secret_directory",
    "SHOW memory_limit",
    "select * from (SHOW allowed_directories)",
    "with s as (SHOW temp_directory) select * from s",
    "select * from pragma_database_size()",
    "select * from duckdb_profiling_settings()",
    "select 1 where 'x' in (show temp_directory)",
    "select (select * from (show temp_directory)) as t",
    "select 'a' as x union all select * from (show temp_directory)",
    "select * from range(1) r, lateral (select * from (show temp_directory))",
    "select * from (select 1) t(x) join (show temp_directory) s on true",
    "select * from samples where prompt_id in (select * from (show temp_directory))",
    "describe (show allowed_directories)",
    "summarize (show allowed_directories)",
    "describe show allowed_directories",
    "describe allowed_directories",
    "summarize temp_directory",
    "explain analyze show temp_directory",
    "explain show secret_directory",
    'SHOW "allowed_directories"',
    "ShOw Temp_Directory",
    "show databases",
    "show variables",
    # settings, paths, memory and logs through functions and system views, in any spelling
    "from duckdb_settings()",
    "select * from system.main.duckdb_settings()",
    "select * from pragma_show('allowed_directories')",
    "select \"current_setting\"('temp_directory')",
    "select CURRENT_SETTING('temp_directory')",
    "select main.current_setting('temp_directory')",
    "select list_transform([1], x -> current_setting('temp_directory'))",
    "select * from read_text(current_setting('temp_directory') || '/secret.txt')",
    "select getvariable('x')",
    "select * from duckdb_extensions()",
    "select * from duckdb_extension_repositories()",
    "select * from duckdb_databases()",
    "select path from duckdb_databases",
    "select * from pragma_database_list",
    "select * from pg_catalog.pg_database",
    "select * from duckdb_memory()",
    "select * from duckdb_logs",
    "select * from enable_logging()",
    "select * from duckdb_external_file_cache()",
    "select get_block_size('memory')",
    "select * from duckdb_variables()",
    "select * from duckdb_live_query_metrics()",
    "select * from query_table('duckdb_settings')",
    "select * from summary((show temp_directory))",
]


@pytest.fixture()
def arena(tmp_path, monkeypatch):
    root = tmp_path / "work"
    store = Store.create(root / "store")
    p = prompt_row("2+2?", "4")
    store.write("prompts", [p])
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i) for i in range(3)], round=0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], i, False) for i in range(3)], round=0)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(CANARY)
    (root / ".tmp").mkdir()
    (root / ".tmp" / "secret.txt").write_text(TEMP_CANARY)
    monkeypatch.chdir(root)
    return store, outside, tmp_path


def snapshot(root):
    """Every file and directory; `.locks/` holds only the empty lock files of stages that started."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if ".locks" not in p.parts}


def assert_nothing_leaked(output: str, outside) -> None:
    for secret in (CANARY, TEMP_CANARY, PASSWD, "replay-sql-"):  # paths the user typed may be echoed
        assert secret not in output, f"leaked {secret!r}: {output[:300]}"


def assert_no_setting_leaked(output: str, top) -> None:
    """Beyond the canaries: no size (the memory limit prints as `1.8 GiB`) and no path in the home
    directory (secret_directory, the extension directory) unless the test's own files are there."""
    home = os.path.join(os.path.expanduser("~"), "")
    for secret in ("GiB", "MiB", "KiB", *([home] if home != os.sep and not str(top).startswith(home) else [])):
        assert secret not in output, f"leaked {secret!r}: {output[:300]}"


@pytest.mark.parametrize("attack", REFUSED)
def test_attack_is_refused_and_nothing_is_read_or_written(arena, attack):
    store, outside, top = arena
    before = snapshot(top)
    result = invoke("sql", "--store", store.root, attack.format(S=store.root, O=outside))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and "Traceback" not in result.output
    assert_nothing_leaked(result.output, outside)
    assert_no_setting_leaked(result.output, top)
    assert snapshot(top) == before


def test_refusal_names_the_reason(arena):
    store, outside, _ = arena
    result = invoke("sql", "--store", store.root, TRICK + f"copy (select 1 as x) to '{store.root}/pwn.csv'")
    assert "EXPLAIN of a COPY statement" in result.output
    result = invoke("sql", "--store", store.root, "select current_setting('temp_directory')")
    assert "current_setting() is not available" in result.output
    result = invoke("sql", "--store", store.root, "select 1; select 2")
    assert "one statement at a time" in result.output
    result = invoke("sql", "--store", store.root, "select * from (show temp_directory)")
    assert "refused: SHOW temp_directory" in result.output and "DESCRIBE <view>" in result.output
    result = invoke("sql", "--store", store.root, "from pragma_database_size()")
    assert "table function pragma_database_size() is not available" in result.output


def test_every_system_view_and_macro_passes_the_guard_or_is_refused_by_name():
    """The guard reads the syntax tree, which names a system view or macro but not what it calls:
    each of the installed DuckDB's whose own SQL the guard refuses must be refused by name."""
    import re

    import duckdb

    from replay.errors import ReplayError
    from replay.sqlguard import DENIED_FUNCTIONS, DENIED_TABLES, check_read_only

    con = duckdb.connect()
    views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE internal").fetchall()
    macros = con.execute("SELECT DISTINCT function_name, macro_definition FROM duckdb_functions() "
                         "WHERE internal AND function_type = 'macro'").fetchall()
    missed = []
    for kind, name, query, denied in (
            [("view", n, re.sub(r"(?is)^\s*CREATE\s+(TEMP\s+)?VIEW\s+\S+\s+AS\s+", "", q).rstrip(";"),
              DENIED_TABLES) for n, q in views]
            + [("macro", n, f"SELECT {q}", DENIED_FUNCTIONS) for n, q in macros]):
        try:
            check_read_only(con, query)
        except ReplayError:
            if name not in denied:
                missed.append(f"{kind} {name}")
    assert not missed, f"add to sqlguard's DENIED_TABLES / DENIED_FUNCTIONS: {missed}"


HARMLESS = [  # queries that look odd but only read the store: they run, and still leak nothing
    "explain select count(*) from samples",
    "explain analyze select count(*) from samples",
    "EXPLAIN /* analyze */ SELECT 1",
    "select '; copy (select 1) to ''pwn.csv''' as s",
    "select $$ ; copy (select 1) to 'pwn.csv' $$ as s",
    "select 1 -- ; copy (select 1) to 'pwn.csv'",
    "select count(*) from read_text('{S}/store.json')",
    "select count(*) from glob('{S}/rollouts/*/*')",
    "describe samples",
    "summarize select n_correct from groups",
    "show tables",
    "show all tables",
    "select view_name, sql from duckdb_views()",
    "select table_name from information_schema.tables",
    "select * from pragma_table_info('samples')",
    "select * from (describe samples) where column_name = 'prompt_id'",
    "from verdicts select count(*)",
    "values (1), (2)",
]


@pytest.mark.parametrize("query", HARMLESS)
def test_harmless_lookalikes_run_and_write_nothing(arena, query):
    store, outside, top = arena
    before = snapshot(top)
    result = invoke("sql", "--store", store.root, query.format(S=store.root), "-f", "csv")
    assert result.exit_code == 0, result.output
    assert_nothing_leaked(result.output, outside)
    assert snapshot(top) == before


def test_explain_analyze_runs_the_query_plan(arena):
    store, _, _ = arena
    result = invoke("sql", "--store", store.root, "explain analyze select count(*) from verdicts", "-f", "json")
    assert result.exit_code == 0 and "explain_value" in result.output


@pytest.mark.parametrize("target", ["file", "dir"])
def test_symlink_out_of_the_store_is_refused(arena, target):
    store, outside, top = arena
    link = store.root / "rollouts" / ("link.txt" if target == "file" else "round=7")
    os.symlink(outside / "secret.txt" if target == "file" else outside, link)
    before = snapshot(top)
    for query in (f"select * from read_text('{link}')", "select 1"):
        result = invoke("sql", "--store", store.root, query)
        assert result.exit_code == 1 and "symbolic link out of the store" in result.output
        assert CANARY not in result.output
    assert snapshot(top) == before


@pytest.mark.parametrize("output", ["{S}/rollouts/round=0/part-x.parquet", "{S}/store.json", "{S}/new/q.parquet",
                                    "{S}/../store/verdicts/round=0/part-y.parquet"])
def test_output_inside_the_store_is_refused(arena, output):
    store, _, top = arena
    before = snapshot(top)
    result = invoke("sql", "--store", store.root, "select * from rollouts", "-f", "parquet",
                    "-o", output.format(S=store.root))
    assert result.exit_code == 1 and "inside the store" in result.output
    assert snapshot(top) == before
    assert store.query("select count(*) as n from rollouts").column("n")[0].as_py() == 3


def test_output_through_a_symlink_into_the_store_is_refused(arena, tmp_path):
    store, _, top = arena
    os.symlink(store.root / "rollouts", tmp_path / "innocent")
    result = invoke("sql", "--store", store.root, "select * from rollouts", "-f", "parquet",
                    "-o", tmp_path / "innocent" / "round=0" / "part-z.parquet")
    assert result.exit_code == 1 and "inside the store" in result.output
    assert not list(store.root.rglob("part-z*"))


def test_inspect_prompt_id_is_a_value_not_sql(arena):
    store, outside, top = arena
    before = snapshot(top)
    for ident in ("x' OR '1'='1", "'; copy (select 1) to 'pwn.csv'; --", "$$ or 1=1 --"):
        result = invoke("inspect", "prompt", ident, "--store", store.root)
        assert result.exit_code == 1 and "no rollouts for prompt" in result.output
    assert snapshot(top) == before


WHERE_INJECTION = (
    "(SELECT $$a$$lo WHERE 'z' <> $$) IS NOT NULL)) SELECT 1; COPY (SELECT content FROM read_text('/etc/passwd')) "
    "TO 'pwn.csv'; SELECT 1 FROM (SELECT 1 AS round, 1 AS prompt_id) in_window, (SELECT 1 AS x) t "
    "WHERE ((1 = 1 OR 'q' = $$) IS NOT NULL -- $$"
)


@pytest.mark.parametrize("where", [
    "cast((select allowed_directories[2] from (SHOW allowed_directories)) as int) = 1",  # issue 24 §3
    "prompt_id IN (SHOW temp_directory)",
    "true) SELECT 1; COPY (SELECT 1) TO 'pwn.csv'; SELECT (1",
    "prompt_id IN (SELECT content FROM read_text('/etc/passwd'))",
    "current_setting('allowed_directories') IS NOT NULL",
    "prompt_id IN (SELECT * FROM query('select 1'))",
    "1 = 1; SELECT 2",
])
def test_learn_where_cannot_run_sql(arena, where):
    store, outside, top = arena
    before = snapshot(top)
    result = invoke("learn", "--store", store.root, "--round", 0, "--where", where)
    assert result.exit_code == 1 and result.output.startswith("error:"), result.output
    assert_nothing_leaked(result.output, outside)
    assert snapshot(top) == before


@pytest.mark.parametrize("prompts", ["SHOW temp_directory", "select * from (show allowed_directories)",
                                     "from duckdb_settings()"])
def test_eval_prompts_cannot_read_settings(arena, prompts):
    # the prompt query is checked before any model is loaded: the refusal, not a "not prompts" error
    # quoting the setting's value
    store, outside, top = arena
    before = snapshot(top)
    result = invoke("eval", "--store", store.root, "--round", -1, "--prompts", prompts)
    assert result.exit_code == 1 and result.output.startswith("error: refused:"), result.output
    assert_nothing_leaked(result.output, outside)
    assert snapshot(top) == before


def test_the_issues_where_injection_is_one_harmless_expression(arena):
    # `$$…$$` quotes make the whole payload one scalar subquery over string literals: with the
    # predicate parsed as an expression (never spliced into learn's statement, no `$lo` rewriting)
    # it selects rows and runs nothing; learn then trains on what it matched, and nothing outside
    # the store's learn outputs changes
    store, outside, top = arena

    def outside_the_store():
        return {k: v for k, v in snapshot(top).items() if not k.startswith("work/store")}

    def data():
        return store.query("SELECT (SELECT count(*) FROM rollouts) AS r, (SELECT count(*) FROM verdicts) AS v, "
                           "(SELECT count(*) FROM prompts) AS p").to_pylist()

    before, rows = outside_the_store(), data()
    result = invoke("learn", "--store", store.root, "--round", 0, "--where", WHERE_INJECTION, "--lr", "1e-6")
    assert result.exit_code == 0, result.output
    assert_nothing_leaked(result.output, outside)
    assert not list(top.rglob("pwn.csv")) and outside_the_store() == before and data() == rows
