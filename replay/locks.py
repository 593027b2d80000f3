"""Per-round stage locks: one writer of a round's table at a time.

Two copies of `replay generate` (or score, import, learn) on one round would each find the same
work missing and both write it: duplicate keys. Each stage run holds an exclusive `flock` on
`<store>/.locks/round=R/<table>.lock` for the table it fills (generate and import share
`rollouts`); a shard worker (`--shard i/n`) holds its own shard's lock exclusively and the table's
lock shared, so shards run side by side but never beside an unsharded run or a second copy of
themselves. The kernel releases a lock when its holder dies (kill -9 included), so a crashed
holder never leaves a stale lock behind. On an `s3://` store the lock is a lease object taken by
conditional write (replay.storage.s3_lease.S3Lease), stale once its holder stops renewing it; shards
there lock only their own shard.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ReplayError
from .keys import parse_shard
from .storage import is_remote, resolve
from .storage.local import open_lock, refuse_unusual

LOCK_DIR = ".locks"
LEASE_SECONDS = float(os.environ.get("REPLAY_LEASE_SECONDS", 300))


class StageBusy(ReplayError):
    """Another process holds the lock of this stage on this round."""


def lock_path(root: Path, round: int, name: str) -> Path:
    return Path(root) / LOCK_DIR / f"round={int(round)}" / f"{name}.lock"


def lock_name(round: int, table: str, shard: tuple[int, int]) -> str:
    index, count = shard
    return f"{LOCK_DIR}/round={int(round)}/{table}" + (f".shard-{index}-of-{count}" if count > 1 else "") + ".lock"


@contextlib.contextmanager
def _lease(root, name: str, stage: str, round: int) -> Iterator[None]:
    from .storage.s3_lease import LeaseHeld

    lease = root.storage.lease(name, LEASE_SECONDS, holder=f"{stage}, pid {os.getpid()} on {socket.gethostname()}")
    try:
        lease.acquire()
    except LeaseHeld as exc:
        raise StageBusy(f"cannot run {stage} on round {round}: another process is writing that round "
                        f"({exc.holder}); let it finish, then rerun to pick up anything left") from None
    with lease:
        yield


def locked_stage(table: str | Callable[[object], str], stage: str, creates_store: bool = False):
    """Decorate a stage's `run(store_path, cfg, ...)`: it runs holding `table`'s lock on cfg.round.

    Under torchrun only rank 0 takes it (it alone writes); a missing store is left to the stage's own
    error unless the stage creates stores. The config is checked first (`cfg.validate()`, where the
    config has one), and a stage that creates stores refuses a directory that holds something but no
    store.json, so a refused command takes no lock and writes nothing."""
    def decorate(run):
        @functools.wraps(run)
        def wrapper(store_path, cfg, *args, **kwargs):
            if callable(getattr(cfg, "validate", None)):
                cfg.validate()
            root = resolve(store_path)
            if int(os.environ.get("RANK", "0")) != 0 or not (creates_store or (root / "store.json").exists()):
                return run(store_path, cfg, *args, **kwargs)
            name = table(cfg) if callable(table) else table
            if is_remote(root):
                with _lease(root, lock_name(cfg.round, name, parse_shard(getattr(cfg, "shard", "0/1"))), stage,
                            cfg.round):
                    return run(store_path, cfg, *args, **kwargs)
            refuse_unusual(root)  # a link or FIFO anywhere in the store: this run would read or write through it
            refuse_non_store(root)
            fresh, had_locks = not root.exists(), (root / LOCK_DIR).exists()
            shard = parse_shard(getattr(cfg, "shard", "0/1"))
            # the lock this run holds exclusively (a shard worker's own; the table's is shared by shards)
            own = lock_path(root, cfg.round, name if shard[1] == 1 else f"{name}.shard-{shard[0]}-of-{shard[1]}")
            made = not own.exists()
            try:
                with stage_lock(root, cfg.round, name, stage, shard):
                    try:
                        return run(store_path, cfg, *args, **kwargs)
                    except BaseException:
                        if made:  # a refused run leaves no lock file either
                            _remove_own_lock(own)
                        raise
            finally:
                if not (root / "store.json").exists():  # refused before creating the store: leave no trace
                    if not had_locks:
                        shutil.rmtree(root / LOCK_DIR, ignore_errors=True)
                    if fresh and root.is_dir() and not any(root.iterdir()):
                        root.rmdir()
        return wrapper
    return decorate


# replay's own entries in a directory that is becoming a store (a `replay round` tick locks it first)
OWN_ENTRIES = (LOCK_DIR, ".round.lock")


def refuse_non_store(root: Path) -> None:
    """A directory without store.json that holds anything but lock files is not replay's to fill: a store
    that lost its store.json (the rows there may be another base model's), or someone's other files."""
    if is_remote(root) or (root / "store.json").exists() or not root.is_dir():
        return
    other = sorted(p.name for p in root.iterdir() if p.name not in OWN_ENTRIES)
    if other:
        listed = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise ReplayError(f"{root} is not a replay store (no store.json) and is not empty ({listed}): give a new "
                          f"or empty directory, or restore the store's store.json")


@contextlib.contextmanager
def stage_lock(root: Path, round: int, table: str, stage: str, shard: tuple[int, int] = (0, 1),
               wait: bool = False) -> Iterator[None]:
    """Hold `table`'s lock on `round` (and the shard's, for a shard worker), or raise StageBusy."""
    index, count = shard
    with contextlib.ExitStack() as stack:
        if count == 1:
            stack.enter_context(_flock(root, lock_path(root, round, table), fcntl.LOCK_EX, wait, stage, round))
        else:
            stage = f"{stage} --shard {index}/{count}"
            stack.enter_context(_flock(root, lock_path(root, round, table), fcntl.LOCK_SH, wait, stage, round))
            stack.enter_context(_flock(root, lock_path(root, round, f"{table}.shard-{index}-of-{count}"),
                                       fcntl.LOCK_EX, wait, stage, round))
        yield


def table_lock(root, table: str) -> contextlib.AbstractContextManager:
    """A short store-wide lock for a table that is not per round (prompts); waits for its turn."""
    if is_remote(root):
        return root.storage.lease(f"{LOCK_DIR}/{table}.lock", LEASE_SECONDS).acquire(wait=True, poll=0.5)
    return _flock(root, Path(root) / LOCK_DIR / f"{table}.lock", fcntl.LOCK_EX, True, f"writing {table}", -1)


@contextlib.contextmanager
def _flock(root: Path, path: Path, mode: int, wait: bool, stage: str, round: int) -> Iterator[None]:
    fd = _acquire(root, path, mode, wait, stage, round)
    try:
        if mode == fcntl.LOCK_EX:
            os.pwrite(fd, f"{stage}, pid {os.getpid()} on {socket.gethostname()}".ljust(300).encode(), 0)
        try:
            yield
        finally:
            if mode == fcntl.LOCK_EX:
                os.ftruncate(fd, 0)  # shared holders write nothing: no stale name for the next message
    finally:
        os.close(fd)  # closing releases the lock


def _acquire(root: Path, path: Path, mode: int, wait: bool, stage: str, round: int) -> int:
    """A descriptor of the lock file `path`, locked. A stage run that fails removes the lock file it
    created, while it still holds it (`locked_stage`): a lock then taken on a file that is no longer at
    `path` guards nothing, so it is dropped and the file at `path` now is locked instead."""
    for _ in range(100):
        try:
            fd = open_lock(root, path)  # never through a link: the holder is written into it, truncated after
        except FileNotFoundError:  # its directory was removed between the mkdir and the open: again
            continue
        try:
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "shard workers"
            os.close(fd)
            raise StageBusy(f"cannot run {stage} on round {round}: another process is writing that round "
                            f"({holder}); let it finish, then rerun to pick up anything left") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)
    raise ReplayError(f"cannot lock {path}: it keeps being removed")


def _same_file(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)


def _remove_own_lock(path: Path) -> None:
    """Unlink a lock file this run created and still holds exclusively (then its round's directory, if
    that is empty): a refused run leaves no lock file behind. Whoever opened the file meanwhile finds
    it gone once it gets the lock (`_acquire`) and locks the new one."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def lock_holder(root, round: int, table: str) -> str | None:
    """Who holds `table`'s lock on `round`, or one of its shard locks (the holder's name, or "shard
    workers"); None when nobody does. A probe: it creates nothing and waits for nothing (a shared lock
    taken and dropped at once; a writer that starts in that same instant is refused as by any holder,
    and can rerun). An s3:// store's leases are not probed: None."""
    if is_remote(root):
        return None
    directory = lock_path(root, round, table).parent
    if not directory.is_dir():
        return None
    for path in [directory / f"{table}.lock", *sorted(directory.glob(f"{table}.shard-*.lock"))]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # missing, or a link (the write commands refuse those)
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 300, 0).decode(errors="replace").strip() or "shard workers"
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return None


SHARD_STAGE = re.compile(r"(.+)\.shard-(\d+)-of-(\d+)")


def stage_kind(stage: str) -> str:
    """generate.shard-0-of-4 -> generate, eval-score -> score, generate.ps-…-k4 -> generate."""
    return stage.split(".")[0].removeprefix("eval-")


def stage_manifests(root, round: int, kinds: tuple[str, ...]) -> dict[str, dict | None]:
    """The round's manifests of stages of these kinds, by stage name (None: unreadable)."""
    found = {}
    for path in sorted((root / "manifests" / f"round={int(round)}").glob("*.json")):
        stage = path.name[:-len(".json")]
        if path.name.startswith(".tmp-") or stage_kind(stage) not in kinds:
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        found[stage] = record if isinstance(record, dict) else None
    return found


def unfinished_stages(root, round: int, kinds: tuple[str, ...]) -> list[str]:
    """The stages of these kinds that did not finish `round`, as the manifests say: one whose manifest
    is not complete (a prompt-set generate records `running` before it samples), and each shard of a
    sharded run without a manifest (unless an unsharded run of the stage completed the round)."""
    records = stage_manifests(root, round, kinds)
    complete = {s for s, r in records.items() if r is not None and r.get("status") == "complete"}
    out = [f"{s} (its manifest says {'nothing readable' if r is None else repr(r.get('status'))})"
           for s, r in records.items() if s not in complete]
    shards: dict[tuple[str, int], set[int]] = {}
    for s in records:
        if m := SHARD_STAGE.fullmatch(s):
            shards.setdefault((m[1], int(m[3])), set()).add(int(m[2]))
    for (base, count), seen in sorted(shards.items()):
        if base not in complete:
            out += [f"{base} --shard {i}/{count} (no manifest)" for i in range(count) if i not in seen]
    return out
