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
import os
import shutil
import socket
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
    error unless the stage creates stores."""
    def decorate(run):
        @functools.wraps(run)
        def wrapper(store_path, cfg, *args, **kwargs):
            root = resolve(store_path)
            if int(os.environ.get("RANK", "0")) != 0 or not (creates_store or (root / "store.json").exists()):
                return run(store_path, cfg, *args, **kwargs)
            name = table(cfg) if callable(table) else table
            if is_remote(root):
                with _lease(root, lock_name(cfg.round, name, parse_shard(getattr(cfg, "shard", "0/1"))), stage,
                            cfg.round):
                    return run(store_path, cfg, *args, **kwargs)
            refuse_unusual(root)  # a link or FIFO anywhere in the store: this run would read or write through it
            fresh = not root.exists()
            try:
                with stage_lock(root, cfg.round, name, stage, parse_shard(getattr(cfg, "shard", "0/1"))):
                    return run(store_path, cfg, *args, **kwargs)
            finally:
                if not (root / "store.json").exists():  # refused before creating the store: leave no trace
                    shutil.rmtree(root / LOCK_DIR, ignore_errors=True)
                    if fresh and root.is_dir() and not any(root.iterdir()):
                        root.rmdir()
        return wrapper
    return decorate


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
    fd = open_lock(root, path)  # never through a link: the holder is written into it, truncated after
    try:
        try:
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "shard workers"
            raise StageBusy(f"cannot run {stage} on round {round}: another process is writing that round "
                            f"({holder}); let it finish, then rerun to pick up anything left") from None
        if mode == fcntl.LOCK_EX:
            os.pwrite(fd, f"{stage}, pid {os.getpid()} on {socket.gethostname()}".ljust(300).encode(), 0)
        try:
            yield
        finally:
            if mode == fcntl.LOCK_EX:
                os.ftruncate(fd, 0)  # shared holders write nothing: no stale name for the next message
    finally:
        os.close(fd)  # closing releases the lock
