"""Links anywhere in the store, and glob characters in its path (issue 24).

replay makes only regular files and directories in a store, so a symbolic link, a FIFO or a device
below its root was put there by someone else. Each attack plants one in a copy of an imported store
(no model) and runs a write command: it must refuse with one line naming the path, leave every file
outside the store and inside it byte-identical, and `replay doctor` must list the path.
"""

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from replay import adapters
from replay.locks import stage_lock, table_lock
from replay.read.doctor import diagnose
from replay.storage import log_dir
from replay.storage.local import HOST_TAG, UnsafePath
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._store_rows import verdict_row

IMPORTANT = b"IMPORTANT\n"
DEAD_TEMP = f".tmp-999999999-{HOST_TAG}-left.parquet"  # a dead writer's temp file: writers reap these
SCORE = ["score", "--round", 0, "--workers", 1, "-q"]
IMPORT = ["import", "{rows}", "--round", 1]
ROUND = ["round", "--set", "generate.shard=2/1"]  # fails on its config after taking the round lock
LEARN = ["learn", "--round", 0]


@pytest.fixture(autouse=True)
def deadline():
    """A reader that opens a FIFO blocks forever: fail instead (the signal interrupts the open)."""
    def expire(*_):
        raise TimeoutError("blocked: something opened a FIFO")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The issue's store S: 3 imported rollouts of round 0, with their lock files."""
    top = tmp_path_factory.mktemp("base")
    rows = top / "rows.jsonl"
    rows.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "answer": str(a + 1),
                                        "completion": f"\\boxed{{{a + 1}}}"}) + "\n" for a in range(3)))
    invoke_ok("import", rows, "--store", top / "S", "--round", 0)
    return top


@pytest.fixture()
def arena(base, tmp_path):
    """(store, outside, rows): a fresh copy of S, a directory outside it with a victim file, and the
    import input."""
    store = tmp_path / "store"
    shutil.copytree(base / "S", store, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(IMPORTANT)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "What is 9 + 9?", "answer": "18", "completion": "\\boxed{18}"}) + "\n")
    return store, outside, rows


def snapshot(top: Path) -> dict:
    """Every entry under `top` without following links: file contents' hashes, link targets, kinds."""
    seen = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(directory, name)
            rel = str(path.relative_to(top))
            if path.is_symlink():
                seen[rel] = "link " + os.readlink(path)
            elif path.is_file():
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[rel] = "dir" if path.is_dir() else "other"
    return seen


def refused(result, path: Path) -> None:
    """Exit 1 with one line naming `path`, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert f"refused: {path} is " in result.output and "Traceback" not in result.output, result.output


def to_outside(store: Path, outside: Path, rel: str) -> Path:
    """Move store/rel (a file or a directory) outside, a dead writer's temp file beside it, and put a
    link to it in its place. Returns the link."""
    path, target = store / rel, outside / rel.replace("/", "_")
    if path.is_dir():
        shutil.copytree(path, target)
        shutil.rmtree(path)
    elif path.exists():
        shutil.copyfile(path, target)
        path.unlink()
    else:
        target.mkdir()
    if target.is_dir():
        (target / DEAD_TEMP).write_bytes(b"not replay's to delete")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def to_victim(store, outside, rel):
    path = store / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.symlink(outside / "victim.txt", path)
    return path


def dangling(store, outside, rel):
    (store / rel).unlink(missing_ok=True)
    os.symlink(outside / "created-through-the-link.txt", store / rel)
    return store / rel


def fifo(store, outside, rel):
    (store / rel).unlink(missing_ok=True)
    os.mkfifo(store / rel)
    return store / rel


def to_store_json(store, outside, rel):
    (store / rel).unlink(missing_ok=True)
    os.symlink("../../store.json", store / rel)  # inside the store: a lock would truncate the store's metadata
    return store / rel


def a_part(store, outside, rel):
    part = next((store / "rollouts" / "round=0").glob("part-*.parquet"))
    shutil.copyfile(part, outside / "part.parquet")
    os.symlink(outside / "part.parquet", store / rel)
    return store / rel


ATTACKS = {
    # the reproductions
    "verdicts lock -> victim (score)": (to_victim, ".locks/round=0/verdicts.lock", SCORE),
    "prompts lock -> victim (import)": (to_victim, ".locks/prompts.lock", IMPORT),
    "round lock -> victim (round, config error)": (to_victim, ".round.lock", ROUND),
    # more links
    "dangling lock link": (dangling, ".locks/round=0/verdicts.lock", SCORE),
    "lock -> the store's own store.json": (to_store_json, ".locks/round=0/verdicts.lock", SCORE),
    "rollouts/round=0 -> outside": (to_outside, "rollouts/round=0", SCORE),
    ".locks -> outside": (to_outside, ".locks", SCORE),
    "manifests/round=0 -> outside": (to_outside, "manifests/round=0", SCORE),
    "verdicts -> outside": (to_outside, "verdicts", SCORE),
    "group_summary/round=0 -> outside": (to_outside, "group_summary/round=0", SCORE),
    "adapters/round=0 -> outside (learn)": (to_outside, "adapters/round=0", LEARN),
    "logs -> outside (round)": (to_outside, "logs", ROUND),
    "logs/rounds.log -> victim (round)": (to_victim, "logs/rounds.log", ROUND),
    "a part file that is a link": (a_part, "rollouts/round=0/part-linked.parquet", SCORE),
    "store.json -> outside": (to_outside, "store.json", SCORE),
    # not regular files
    "FIFO verdicts lock": (fifo, ".locks/round=0/verdicts.lock", SCORE),
    "FIFO prompts lock (import)": (fifo, ".locks/prompts.lock", IMPORT),
    "FIFO round lock (round)": (fifo, ".round.lock", ROUND),
    "FIFO part file": (fifo, "rollouts/round=0/part-fifo.parquet", SCORE),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_write_command_refuses_a_store_holding_a_link_or_fifo(arena, attack):
    store, outside, rows = arena
    plant, rel, command = ATTACKS[attack]
    planted = plant(store, outside, rel)
    before = snapshot(outside.parent)
    result = invoke(*[str(a).format(rows=rows) for a in command], "--store", store)
    refused(result, planted)
    assert snapshot(outside.parent) == before  # outside, the store and the input: byte-identical
    assert (outside / "victim.txt").read_bytes() == IMPORTANT
    assert [p.path for p in diagnose(store).errors] == [planted]


def test_a_healthy_store_still_scores(arena):
    store, outside, rows = arena
    before = snapshot(outside)
    invoke_ok(*SCORE, "--store", store)
    invoke_ok("import", rows, "--store", store, "--round", 1)
    assert Store.open(store).query("SELECT count(*) AS n FROM verdicts").column("n")[0].as_py() == 3
    assert snapshot(outside) == before and not diagnose(store).errors


def test_doctor_lists_every_link_and_fifo(arena):
    store, outside, _ = arena
    planted = [to_victim(store, outside, ".locks/round=0/verdicts.lock"), fifo(store, outside, ".round.lock"),
               to_outside(store, outside, "logs"), to_outside(store, outside, "rollouts/round=0"),
               to_store_json(store, outside, ".locks/round=0/rollouts.lock")]
    assert sorted(p.path for p in diagnose(store).errors) == sorted(planted)
    result = invoke("doctor", "--store", store)
    assert result.exit_code == 1 and all(str(p) in result.output for p in planted), result.output
    assert "Traceback" not in result.output


# -- each rule on its own: the command-level refusal above runs before any of them --------------------
def test_a_lock_opens_no_link_at_its_own_name(arena):
    store, outside, _ = arena
    for plant, victim in ((to_victim, outside / "victim.txt"), (dangling, outside / "created-through-the-link.txt")):
        link = plant(store, outside, ".locks/round=0/verdicts.lock")
        with pytest.raises(UnsafePath, match=f"refused: {link} is a symbolic link"):
            with stage_lock(store, 0, "verdicts", "score"):
                pass
        assert victim.read_bytes() == IMPORTANT if plant is to_victim else not victim.exists()


def test_a_lock_that_is_a_fifo_is_refused(arena):
    store, outside, _ = arena
    path = fifo(store, outside, ".locks/round=0/verdicts.lock")
    with pytest.raises(UnsafePath, match=f"refused: {path} is a FIFO"):
        with stage_lock(store, 0, "verdicts", "score"):
            pass


def test_a_lock_directory_that_is_a_link_is_refused(arena):
    store, outside, _ = arena
    link = to_outside(store, outside, ".locks")
    before = snapshot(outside)
    with pytest.raises(UnsafePath, match=f"refused: {link} is a symbolic link"):
        with table_lock(store, "prompts"):
            pass
    assert snapshot(outside) == before


def test_store_writes_go_through_no_linked_directory(arena):
    store, outside, _ = arena
    opened = Store.open(store)
    pid = opened.query("SELECT prompt_id FROM rollouts LIMIT 1").column("prompt_id")[0].as_py()
    verdicts = to_outside(store, outside, "verdicts/round=0")
    manifests = to_outside(store, outside, "manifests/round=0")
    before = snapshot(outside)
    with pytest.raises(UnsafePath, match=f"refused: {verdicts} is a symbolic link"):
        opened.write("verdicts", [verdict_row(0, pid, 0, True)], round=0)
    with pytest.raises(UnsafePath, match=f"refused: {manifests} is a symbolic link"):
        opened.write_manifest(0, "score", json.loads((outside / "manifests_round=0" / "import.json").read_text()))
    assert snapshot(outside) == before


class _Model:
    def save_pretrained(self, directory, safe_serialization=True):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / adapters.MARKER).write_text("{}")


def test_adapter_save_goes_through_no_linked_directory(arena):
    store, outside, _ = arena
    opened = Store.open(store)
    assert adapters.exists(adapters.save(_Model(), opened.adapter_dir(0), {}))  # the control
    link = to_outside(store, outside, "adapters")
    before = snapshot(outside)
    with pytest.raises(UnsafePath, match=f"refused: {link} is a symbolic link"):
        adapters.save(_Model(), opened.adapter_dir(1, "ab"), {})
    assert snapshot(outside) == before


def test_the_log_directory_is_no_link(arena):
    store, outside, _ = arena
    link = to_outside(store, outside, "logs")
    with pytest.raises(UnsafePath, match=f"refused: {link} is a symbolic link"):
        log_dir(store)


def test_sql_refuses_a_fifo_instead_of_blocking(arena):
    store, outside, _ = arena
    path = fifo(store, outside, "rollouts/round=0/part-fifo.parquet")
    refused(invoke("sql", "--store", store, "select count(*) from rollouts"), path)


# -- glob characters in the store path ------------------------------------------------------------
GLOB_REFUSED = "a store path may not contain glob characters"


def test_a_glob_store_path_reads_no_other_store(base, tmp_path):
    """`s?` beside `s1`: status counted s1's rows and score wrote verdicts for them into `s?`."""
    s1, sq = tmp_path / "s1", tmp_path / "s?"
    shutil.copytree(base / "S", s1)
    shutil.copytree(base / "S", sq)
    shutil.rmtree(sq / "rollouts")  # `s?` has no rollouts of its own
    before = snapshot(tmp_path)
    for command in (["status"], SCORE):
        result = invoke(*command, "--store", sq)
        assert result.exit_code == 1 and GLOB_REFUSED in result.output and str(sq) in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert {k: v for k, v in snapshot(tmp_path).items() if ".locks" not in k} == \
        {k: v for k, v in before.items() if ".locks" not in k}  # no verdicts in s?, s1 untouched


@pytest.mark.parametrize("name", ["s[1]x", "s*", "s{1,2}"])
def test_a_glob_store_path_is_refused_with_one_line(base, tmp_path, name):
    store = tmp_path / name
    shutil.copytree(base / "S", store)
    for command in (["status"], ["doctor"], ["sql", "select count(*) from rollouts"]):
        result = invoke(*command, "--store", store)
        assert result.exit_code == 1 and GLOB_REFUSED in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    new = tmp_path / f"new-{name}"
    result = invoke("import", base / "rows.jsonl", "--store", new, "--round", 0)
    assert result.exit_code == 1 and GLOB_REFUSED in result.output and not new.exists(), result.output
