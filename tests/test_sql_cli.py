"""`replay sql` is read-only (store files stay byte-identical); inspect and status through the CLI."""

import hashlib
import json

import pytest

from replay.store import Store
from tests._cli import invoke
from tests._store_rows import prompt_row, rollout_row, verdict_row


@pytest.fixture()
def store(tmp_path):
    store = Store.create(tmp_path / "store")
    p = prompt_row("2+2?", "4")
    store.write("prompts", [p])
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i) for i in range(2)], round=0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], i, False) for i in range(2)], round=0)
    return store


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


REFUSED = [
    "INSERT INTO rollouts SELECT * FROM rollouts",
    "UPDATE verdicts SET correct = true",
    "DELETE FROM verdicts",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "DROP VIEW samples",
    "ALTER VIEW samples RENAME TO s2",
    "COPY (SELECT * FROM rollouts) TO '{root}/rollouts/round=0/part-evil.parquet' (FORMAT parquet)",
    "COPY verdicts TO '/tmp/out.csv'",
    "ATTACH '{root}/evil.duckdb' AS evil",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "PRAGMA enable_profiling",
    "EXPORT DATABASE '{root}/dump'",
    "CALL pragma_version()",
    "SELECT 1; DELETE FROM verdicts",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('{root}/../../../../etc/hostname')",
    "SELECT * FROM glob('/*')",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
]


@pytest.mark.parametrize("statement", REFUSED)
def test_write_and_escape_statements_are_refused(store, statement):
    before = snapshot(store.root)
    result = invoke("sql", "--store", store.root, statement.format(root=store.root))
    assert result.exit_code != 0
    assert "error:" in result.output and "Traceback" not in result.output
    assert snapshot(store.root) == before


def test_group_kinds_query_and_formats(store, tmp_path):
    result = invoke("sql", "--store", store.root, "select kind, count(*) as n from groups group by kind",
                    "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ['"kind","n"', '"negative",1']
    result = invoke("sql", "--store", store.root, "select sample_idx from rollouts order by 1", "-f", "json")
    assert json.loads(result.output) == [{"sample_idx": 0}, {"sample_idx": 1}]  # one array
    result = invoke("sql", "--store", store.root, "select sample_idx from rollouts order by 1", "-f", "jsonl")
    assert [json.loads(line) for line in result.output.splitlines()] == [{"sample_idx": 0}, {"sample_idx": 1}]
    result = invoke("sql", "--store", store.root, "select kind, count(*) as n, 0.25 as share, 'a|b' as s "
                    "from groups group by kind", "-f", "markdown")
    assert result.output.splitlines() == ["| kind | n | share | s |", "|---|---|---|---|",
                                          "| negative | 1 | 0.25 | a\\|b |"]
    out = tmp_path / "r.parquet"
    result = invoke("sql", "--store", store.root, "select * from samples", "-f", "parquet", "-o", out)
    assert result.exit_code == 0 and out.exists()
    result = invoke("sql", "--store", store.root, "select prompt_id, kind from groups")
    assert "negative" in result.output


def test_allow_read_widens_reading_on_purpose(store, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "x.csv").write_text("a\n1\n")
    query = f"select a from read_csv('{extra}/x.csv')"
    assert invoke("sql", "--store", store.root, query).exit_code != 0
    result = invoke("sql", "--store", store.root, query, "--allow-read", extra, "-f", "csv")
    assert result.exit_code == 0 and result.output.splitlines() == ['"a"', "1"]


def test_bad_sql_and_missing_store_are_one_line_errors(store, tmp_path):
    result = invoke("sql", "--store", store.root, "SELEC nonsense")
    assert result.exit_code == 1 and result.output.startswith("error:")
    result = invoke("sql", "--store", tmp_path / "missing", "select 1")
    assert result.exit_code == 1 and "no replay store" in result.output


def test_show_tables_lists_the_views(store):
    # issue 30: only the views a query names are bound, and SHOW TABLES names none; it sees them all
    for query, column in (("show tables", "name"), ("show all tables", "name"),
                          ("select view_name from duckdb_views() where not internal", "view_name"),
                          ("select table_name from information_schema.tables", "table_name")):
        result = invoke("sql", "--store", store.root, query, "-f", "json")
        assert result.exit_code == 0, result.output
        names = {row[column] for row in json.loads(result.output)}
        assert {"rollouts", "verdicts", "samples", "groups", "prompts", "stage_runs"} <= names, (query, names)


def test_timeout_stops_an_endless_query(store):
    result = invoke("sql", "--store", store.root, "select count(*) from range(10000000000000)", "--timeout", 1)
    assert result.exit_code == 1
    assert result.output.strip() == "error: query stopped after 1 s (--timeout 1; raise it, or 0 for no limit)"
    result = invoke("sql", "--store", store.root, "select 1", "--timeout", -1)
    assert result.exit_code == 1 and "--timeout -1: give seconds, or 0 for no limit" in result.output


def test_memory_and_spill_limits_apply_and_are_clear_errors(store):
    query = "select count(distinct range::varchar || 'xxxxxxxx') as n from range(1000000)"
    result = invoke("sql", "--store", store.root, query, "-f", "csv")  # the defaults answer it ...
    assert result.exit_code == 0 and result.output.split() == ['"n"', "1000000"], result.output
    # ... 20 MB of memory and 1 MB of spill space do not
    result = invoke("sql", "--store", store.root, query, "--memory-limit", "20MB", "--max-temp-size", "1MB")
    assert result.exit_code == 1 and "Out of Memory" in result.output
    assert "raise --memory-limit or --max-temp-size" in result.output
    result = invoke("sql", "--store", store.root, "select 1", "--memory-limit", "lots")
    assert result.exit_code == 1 and "memory_limit 'lots'" in result.output


def test_sigterm_leaves_no_private_temp_directory(store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from pathlib import Path

    temp = tmp_path / "tmp"
    temp.mkdir()
    repo = str(Path(__file__).parents[1])
    env = os.environ | {"TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "replay", "sql", "--store", str(store.root), "--timeout", "0",
                             "select count(*) from range(10000000000000)"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("replay-sql-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(temp.glob("replay-sql-*")), proc.stderr.read() if proc.poll() is not None else "no temp dir"
        time.sleep(0.5)  # into the query
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(temp.glob("replay-sql-*"))


def test_inspect_and_status(store):
    for what in ("rounds", "negatives", "mistakes"):
        result = invoke("inspect", what, "--store", store.root)
        assert result.exit_code == 0, result.output
    pid = store.query("select prompt_id from prompts").column(0)[0].as_py()
    result = invoke("inspect", "prompt", pid, "--store", store.root)
    assert result.exit_code == 0 and "2+2?" in result.output
    assert invoke("inspect", "prompt", "nope", "--store", store.root).exit_code == 1
    assert invoke("inspect", "bogus", "--store", store.root).exit_code == 1
    result = invoke("status", "--store", store.root)
    assert result.exit_code == 0 and "round" in result.output


def test_help_lists_commands_without_importing_torch():
    import subprocess
    import sys

    code = "import sys; from replay.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = invoke("--help")
    assert result.exit_code == 0 and "sql" in result.output and "inspect" in result.output


HEAVY = ("torch", "transformers", "matplotlib", "pyarrow", "numpy", "pydantic")
COMMANDS = [["--help"], ["sql", "--help"], ["sql", "select count(*) from groups", "-f", "csv"],
            ["sql", "select * from rounds", "-f", "json"], ["sql", "select * from confident_mistakes"],
            ["inspect", "negatives"], ["inspect", "rounds"], ["status"]]


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_read_commands_start_without_heavy_modules(store, args):
    """What `replay sql`, `inspect`, `status` and `--help` import, seen from a fresh interpreter:
    none of torch, transformers, matplotlib; not even pyarrow, numpy or pydantic (start-up time)."""
    import subprocess
    import sys

    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print('heavy:', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
            "from replay.cli import main\nsys.argv = ['replay', *sys.argv[1:]]\nmain()\n")
    store_args = ["--store", str(store.root)] if args[0] != "--help" and "--help" not in args else []
    proc = subprocess.run([sys.executable, "-c", code, *args, *store_args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stderr, proc.stderr


def test_plain_values_keep_their_checks_and_messages(store):
    result = invoke("inspect", "negatives", "--store", store.root, "--limit", "x")
    assert result.exit_code == 2 and "Input should be a valid integer" in result.output
    assert invoke("inspect", "negatives", "--store", store.root, "--limit", "1", "-r", "0").exit_code == 0
    assert invoke("inspect", "negatives", "--store", store.root, "--limit", "٣").exit_code == 2  # not ASCII digits


def test_csv_without_pyarrow_quotes_text_and_writes_numbers_bare(store):
    sql = ("select 'a \"q\", b' as s, 2 as i, 0.5::double as f, true as b, NULL as n, [1, 2] as l, "
           "0.25 as d, DATE '2026-01-02' as day")
    result = invoke("sql", "--store", store.root, sql, "-f", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ['"s","i","f","b","n","l","d","day"',
                                          '"a ""q"", b",2,0.5,true,,"[1, 2]",0.25,2026-01-02']


def test_a_view_the_name_scan_misses_is_still_found(store, monkeypatch):
    # the scan of names finds nothing (as for a view DuckDB would reach some other way): the retry binds all
    import schemas

    monkeypatch.setattr(schemas, "references", lambda sql: set())
    result = invoke("sql", "--store", store.root, "select count(*) as n from groups", "-f", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ['"n"', "1"]


def test_no_progress_bar_in_piped_output(store):
    """DuckDB draws its progress bar on stdout once a query runs longer than progress_bar_time;
    `replay sql` into a pipe or file must not carry it. The control run proves the query is long
    enough for DuckDB to draw one."""
    import subprocess
    import sys

    code = f"""
import duckdb, sys
slow = "select count(*) as n from range(300000000) t(i) where i % 7 = 3"  # about a second
connect = duckdb.connect
def eager_bar(*a, **k):  # a bar after 0.2 s instead of DuckDB's 2 s: the test need not wait
    con = connect(*a, **k)
    con.execute("SET progress_bar_time = 200")
    return con
duckdb.connect = eager_bar
duckdb.connect().sql(slow).fetchall()  # the control: a bar on this (piped) stdout
print("--- cli ---", flush=True)
from replay.cli import app
app(["sql", slow, "--store", {str(store.root)!r}, "-f", "csv"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    control, _, cli = proc.stdout.partition("--- cli ---")
    assert "100% ▕" in control  # DuckDB drew a bar for the control
    assert cli.split() == ['"n"', "42857143"], proc.stdout + proc.stderr  # and none here
def test_output_format_follows_the_extension(store, tmp_path):
    query = "select sample_idx from rollouts order by 1"
    for name, read in (("q.csv", lambda p: p.read_text().splitlines()),
                       ("q.json", lambda p: json.loads(p.read_text())),
                       ("q.jsonl", lambda p: [json.loads(x) for x in p.read_text().splitlines()]),
                       ("q.md", lambda p: p.read_text().splitlines()[0])):
        result = invoke("sql", "--store", store.root, query, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        assert read(tmp_path / name) == {"q.csv": ['"sample_idx"', "0", "1"],
                                         "q.json": [{"sample_idx": 0}, {"sample_idx": 1}],
                                         "q.jsonl": [{"sample_idx": 0}, {"sample_idx": 1}],
                                         "q.md": "| sample_idx |"}[name]
    result = invoke("sql", "--store", store.root, query, "-o", tmp_path / "q.xlsx")
    assert result.exit_code == 1 and "from its extension" in result.output and "markdown" in result.output
    assert not (tmp_path / "q.xlsx").exists()
    result = invoke("sql", "--store", store.root, query, "-f", "csv", "-o", tmp_path / "forced.json")
    assert (tmp_path / "forced.json").read_text().splitlines()[0] == '"sample_idx"'  # -f wins


def test_several_statements_get_a_clear_message(store):
    result = invoke("sql", "--store", store.root, "select 1; select 2")
    assert result.exit_code == 1 and "give one statement at a time (this text holds 2)" in result.output
    assert "unfinished result" not in result.output
    assert invoke("sql", "--store", store.root, "select 1;", "-f", "csv").output.splitlines() == ['"1"', "1"]


def test_count_star_header_and_article(store):
    result = invoke("sql", "--store", store.root, "select count(*) from rollouts", "-f", "csv")
    assert result.output.splitlines()[0] == '"count(*)"'
    result = invoke("sql", "--store", store.root, "attach 'x.db' as x")
    assert "this is an ATTACH statement" in result.output
    assert "stage_runs" in invoke("sql", "--help").output
