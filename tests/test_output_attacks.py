"""Where `-o` / `--out` may write (issues 24 §1, §2; 30 item 6) and what tables print (24 §6).

FIFOs and symlinks stand in for devices: every test writes only under its tmp_path. A FIFO is read
through a read end opened (non-blocking) before the command runs, so a writer never waits for a
reader and a broken writer that replaces the FIFO cannot hang the test.
"""

import hashlib
import importlib.util
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from replay.errors import ReplayError
from replay.read.formats import Rows, write_result
from replay.store import Store
from tests._cli import invoke
from tests._store_rows import prompt_row, rollout_row, verdict_row

# a FIFO test that blocks is a failure, not a hung suite (where pytest-timeout is installed)
pytestmark = [pytest.mark.timeout(60)] if importlib.util.find_spec("pytest_timeout") else []

ESCAPES = "\x1b[2J\x1b[31m\tbell\x07\rdel\x7fcsi\x9b"
SHOWN = "\\x1b[2J\\x1b[31m\\tbell\\x07\\rdel\\x7fcsi\\x9b"  # what a table prints instead


@pytest.fixture()
def store(tmp_path):
    store = Store.create(tmp_path / "e1")
    p = PROBLEM
    store.write("prompts", [p])
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i, text="so" + ESCAPES) for i in range(2)], round=0)
    store.write("verdicts", [verdict_row(0, p["prompt_id"], i, False) for i in range(2)], round=0)
    return store


def snapshot(root):
    """Every file and link under root, by content: any change to the store shows."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def sql(store, *args):
    return invoke("sql", "--store", store.root, "select sample_idx from rollouts order by 1", *args)


CSV = '"sample_idx"\n0\n1\n'


PROBLEM = prompt_row("2+2?" + ESCAPES, "4")


def fifo_with_reader(path):
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def drain(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):  # b"": every writer closed
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


# -- §1: special files are written in place, never replaced --------------------------------------------------
def test_a_fifo_is_written_in_place(store, tmp_path):
    fd = fifo_with_reader(tmp_path / "pipe")
    result = sql(store, "-f", "csv", "-o", tmp_path / "pipe")
    assert result.exit_code == 0, result.output
    assert drain(fd).decode() == CSV
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)  # not replaced by a regular file


def test_a_symlink_to_a_fifo_is_written_through(store, tmp_path):
    fd = fifo_with_reader(tmp_path / "pipe")
    os.symlink(tmp_path / "pipe", tmp_path / "link.csv")
    assert sql(store, "-o", tmp_path / "link.csv").exit_code == 0
    assert drain(fd).decode() == CSV
    assert os.readlink(tmp_path / "link.csv") == str(tmp_path / "pipe")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


def test_export_writes_a_fifo_in_place(store, tmp_path):
    fd = fifo_with_reader(tmp_path / "pipe")
    result = invoke("export", "--store", store.root, "--out", tmp_path / "pipe")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["sample_idx"] for line in drain(fd).decode().splitlines()] == [0, 1]
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


def test_a_write_error_in_place_is_one_line_and_exit_1(store, tmp_path):
    # the reader takes one byte and leaves: the writer of 2 MB (more than a pipe holds) gets EPIPE,
    # as a full device gives ENOSPC
    os.mkfifo(tmp_path / "pipe")

    def read_one_byte():
        with open(tmp_path / "pipe", "rb") as fh:
            fh.read(1)

    reader = threading.Thread(target=read_one_byte, daemon=True)
    reader.start()
    result = invoke("sql", "--store", store.root, "select repeat('x', 2000000) as x", "-f", "csv",
                    "-o", tmp_path / "pipe")
    reader.join(10)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: cannot write {tmp_path / 'pipe'}: Broken pipe"]
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc")
def test_a_name_of_stdout_appends_to_stdout_instead_of_replacing_it(store, tmp_path):
    # the child's stdout is a log in tmp_path opened for appending, as `>> log`; the link stands in for
    # /dev/stdout. Reopening it would truncate the log; replacing it would leave the log untouched.
    os.symlink("/proc/self/fd/1", tmp_path / "stdout")
    (tmp_path / "log").write_text("old\n")
    with open(tmp_path / "log", "a") as log:
        proc = subprocess.run([sys.executable, "-m", "replay", "sql", "--store", str(store.root),
                               "select sample_idx from rollouts order by 1", "-f", "csv", "-o",
                               str(tmp_path / "stdout")], stdout=log, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log").read_text() == "old\n" + CSV
    assert os.readlink(tmp_path / "stdout") == "/proc/self/fd/1"


def test_a_symlink_to_a_regular_file_keeps_the_link_and_replaces_its_file(store, tmp_path):
    (tmp_path / "real.csv").write_text("old")
    os.symlink(tmp_path / "real.csv", tmp_path / "link.csv")
    assert sql(store, "-o", tmp_path / "link.csv").exit_code == 0
    assert os.readlink(tmp_path / "link.csv") == str(tmp_path / "real.csv")
    assert (tmp_path / "real.csv").read_text() == CSV
    os.symlink(tmp_path / "new.csv", tmp_path / "dangling.csv")  # as `>` does: the file it names is made
    assert sql(store, "-o", tmp_path / "dangling.csv").exit_code == 0
    assert os.readlink(tmp_path / "dangling.csv") == str(tmp_path / "new.csv")
    assert (tmp_path / "new.csv").read_text() == CSV


@pytest.mark.parametrize("command", ["sql", "export"])
def test_a_directory_target_is_refused(store, tmp_path, command):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    before = snapshot(tmp_path)
    args = ["-f", "csv", "-o"] if command == "sql" else ["--out"]
    for target in (tmp_path / "d", f"{tmp_path / 'new'}/"):  # an existing directory, a directory's name
        result = (sql(store, *args, target) if command == "sql"
                  else invoke("export", "--store", store.root, *args, target))
        assert result.exit_code == 1 and result.output.count("\n") == 1
        assert result.output.startswith(f"error: refused: {target} ") and "directory" in result.output
    assert snapshot(tmp_path) == before


def test_a_socket_target_is_refused(store, tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        result = sql(store, "-f", "csv", "-o", tmp_path / "sock")
    assert result.output == (f"error: refused: {tmp_path / 'sock'} is neither a regular file, a FIFO nor a "
                             "character device\n")
    assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)


@pytest.mark.parametrize("command", ["sql", "export", "report"])
def test_a_missing_directory_is_refused_not_created(store, tmp_path, command):
    target = tmp_path / "nonexistent" / "dir" / ("x.csv" if command == "sql" else "x.jsonl")
    if command == "sql":
        result = sql(store, "-o", target)
    else:
        result = invoke(command, "--store", store.root, "--out", target)
    assert result.exit_code == 1
    assert f"directory {target.parent} does not exist; create it first" in result.output
    assert not (tmp_path / "nonexistent").exists()


def test_a_file_used_as_a_directory_is_one_line(store, tmp_path):
    (tmp_path / "file").write_text("x")
    result = sql(store, "-o", tmp_path / "file" / "x.csv")
    assert result.output == f"error: cannot write {tmp_path / 'file' / 'x.csv'}: Not a directory\n"


def test_the_target_is_checked_before_the_query_runs(store, tmp_path):
    result = invoke("sql", "--store", store.root, "select * from nosuch", "-o", tmp_path / "no" / "x.csv")
    assert "create it first" in result.output
    (shard,) = store.files("rollouts", 0)
    shard.write_bytes(shard.read_bytes()[:64])  # export's query would now fail, naming the shard
    result = invoke("export", "--store", store.root, "--out", tmp_path / "no" / "x.jsonl")
    assert "create it first" in result.output
    result = invoke("report", "--store", store.root, "--out", tmp_path / "no" / "report")
    assert "create it first" in result.output
    (tmp_path / "file").write_text("x")
    result = invoke("report", "--store", store.root, "--out", tmp_path / "file")
    assert result.output.strip() == f"error: cannot write the report to {tmp_path / 'file'}: not a directory"


def test_dash_is_stdout(store, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    assert sql(store, "-f", "csv", "-o", "-").stdout == CSV
    assert "sample_idx" in sql(store, "-o", "-").stdout  # no -f: the table, as without -o
    assert pq.read_table(pa.BufferReader(sql(store, "-f", "parquet", "-o", "-").stdout_bytes)).num_rows == 2
    result = invoke("export", "--store", store.root, "--out", "-")
    assert [json.loads(line)["sample_idx"] for line in result.stdout.splitlines()] == [0, 1]
    assert result.stderr == "wrote 2 rollouts to stdout\n"
    assert os.listdir(tmp_path) == ["e1"]  # no file named "-"
    monkeypatch.chdir(store.root)  # `-` is no path, so not one inside the store either
    assert sql(store, "-f", "csv", "-o", "-").stdout == CSV
    assert invoke("export", "--store", store.root, "--out", "-").exit_code == 0


def test_parquet_is_not_sent_to_a_terminal(monkeypatch):
    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal(io.BytesIO()))
    with pytest.raises(ReplayError, match="binary Parquet to a terminal"):
        write_result(Rows(["a"], [(1,)]), "parquet", "-")
    assert sys.stdout.buffer.getvalue() == b""


# -- §2: export and report never write into a store -----------------------------------------------------------
def inside_variants(store, tmp_path):
    """Names of the store and of paths in it: plain, through `..`, through a symlink from outside
    (created here), with a trailing slash, the store itself, and another case of its name."""
    root = store.root
    os.symlink(root, tmp_path / "innocent")
    upper = root.parent / root.name.upper()
    return [root / "store.json", root / "rollouts" / "round=0" / "part-evil.parquet", root / "evil.jsonl",
            f"{root}/../{root.name}/store.json", tmp_path / "innocent" / "store.json",
            tmp_path / "innocent" / "rollouts" / "round=0" / "part-evil.parquet", f"{root}/store.json/",
            f"{root}/rollouts/", root, upper / "store.json"]


def test_export_never_writes_into_the_store(store, tmp_path):
    variants = inside_variants(store, tmp_path)
    before = snapshot(tmp_path)
    for out in variants:
        for fmt in ("trl", "jsonl"):
            result = invoke("export", "--store", store.root, "--format", fmt, "--out", out)
            assert result.exit_code == 1 and "Traceback" not in result.output, (out, result.output)
            if "E1" not in str(out):  # the case variant is another (missing) directory on Linux
                assert "inside the store" in result.output, (out, result.output)
        assert snapshot(tmp_path) == before, out
    assert invoke("sql", "--store", store.root, "select count(*) from rollouts", "-f", "csv").stdout.split() == [
        '"count(*)"', "2"]


def test_report_never_writes_into_the_store(store, tmp_path):
    (tmp_path / "other").mkdir()
    compared = Store.create(tmp_path / "other" / "e2")
    variants = [*inside_variants(store, tmp_path), store.root / "rollouts" / "round=0"]
    before = snapshot(tmp_path)
    for out in variants:
        result = invoke("report", "--store", store.root, "--out", out)
        assert result.exit_code == 1 and "Traceback" not in result.output, (out, result.output)
        assert snapshot(tmp_path) == before, out
    # nor into a store it compares with
    result = invoke("report", "--store", store.root, "--compare", compared.root, "--out", compared.root / "r")
    assert result.exit_code == 1 and "inside the store" in result.output
    assert snapshot(tmp_path) == before


# -- issue 30 item 6: a format the output's name contradicts ---------------------------------------------------
def test_export_refuses_a_name_of_another_format(store, tmp_path):
    for fmt, name in (("jsonl", "r.parquet"), ("jsonl", "r.csv"), ("trl", "r.json"), ("trl", "r.md")):
        result = invoke("export", "--store", store.root, "--format", fmt, "--out", tmp_path / name)
        assert result.exit_code == 1 and "names a " in result.output and f"--format {fmt} writes" in result.output
        assert not (tmp_path / name).exists()
    import pyarrow.parquet as pq

    assert invoke("export", "--store", store.root, "--format", "trl", "--out", tmp_path / "t.parquet").exit_code == 0
    assert pq.read_table(tmp_path / "t.parquet").column_names[:4] == ["round", "prompt_id", "sample_idx", "prompt_ids"]
    assert invoke("export", "--store", store.root, "--out", tmp_path / "plain.txt").exit_code == 0  # no format named
    assert json.loads((tmp_path / "plain.txt").read_text().splitlines()[0])["sample_idx"] == 0


# -- §6: control characters from the store never reach the terminal raw -----------------------------------------
def test_tables_show_control_characters_as_escapes(store):
    for result in (invoke("sql", "--store", store.root, "select completion_text from rollouts"),
                   invoke("inspect", "mistakes", "--store", store.root),
                   invoke("inspect", "negatives", "--store", store.root)):
        assert result.exit_code == 0, result.output
        assert SHOWN in result.output
        assert not any(c in result.output for c in "\x1b\x07\r\x7f\x9b\t"), result.output
    title = invoke("inspect", "prompt", PROBLEM["prompt_id"], "--store", store.root).output
    assert f"2+2?{SHOWN}" in title and "\x1b" not in title  # the title holds the problem text
    header = invoke("sql", "--store", store.root, 'select 1 as "a\x1b[2Jb"').output
    assert "a\\x1b[2Jb" in header and "\x1b" not in header
    markdown = invoke("sql", "--store", store.root, 'select 1 as "a\x1bb", \'c\x1bd\' as x', "-f", "markdown").stdout
    assert markdown.splitlines()[0] == "| a\\x1bb | x |" and "| c\\x1bd |" in markdown


def test_files_keep_the_exact_text(store, tmp_path):
    query = "select completion_text from rollouts limit 1"
    assert invoke("sql", "--store", store.root, query, "-f", "jsonl").stdout == json.dumps(
        {"completion_text": "so" + ESCAPES}, ensure_ascii=False) + "\n"
    assert invoke("sql", "--store", store.root, query, "-o", tmp_path / "x.csv").exit_code == 0
    assert (tmp_path / "x.csv").read_bytes().decode() == f'"completion_text"\n"so{ESCAPES}"\n'
