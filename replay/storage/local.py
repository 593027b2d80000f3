"""A store on a local (or shared POSIX) file system: temp file in the same directory, fsync, rename.

Temp files are named `.tmp-<pid>-<host tag>-…`: hidden from readers (they glob `part-*`), and reaped
only by a writer on the same host once the process that wrote them is gone.

replay makes only regular files and directories in a store, so anything else below its root (a
symbolic link, a FIFO, a socket, a device) was put there by someone else: `unusual` says what it is,
the one rule that writers (`writable`, `open_lock`, `refuse_unusual`), the SQL read path and
`replay doctor` apply. A writer never follows a link it did not make.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ReplayError


# temp files name their writer's host: shard workers on several machines share a store directory,
# and a pid is only meaningful on the machine that issued it
HOST_TAG = "h" + hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(name: str) -> str:
    """`.tmp-<pid>-<host tag>-<name>`: hidden from readers, reaped only once its writer is gone."""
    return f".tmp-{os.getpid()}-{HOST_TAG}-{name}"


def _is_host_tag(text: str) -> bool:
    return len(text) == 9 and text[0] == "h" and all(c in "0123456789abcdef" for c in text[1:])


def _write_temp(path: Path, write: Callable[[Path], object]) -> Path:
    """A temp file beside `path`, filled by `write(tmp)` and fsynced (on disk before any rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(f"{uuid.uuid4().hex}-{path.name}"))
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """The one way this project replaces a local file: `write(tmp)` fills a temp file beside `path`,
    fsync, rename, fsync the directory. Readers, a crash or a power cut see the old file or the new."""
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def create_exclusive(path: Path, payload: bytes) -> bool:
    """Write `path` whole unless it exists: a complete temp file hard-linked into place (link fails
    on an existing name), so a racing creator either wins or leaves the winner's file untouched."""
    tmp = None
    try:
        tmp = _write_temp(path, lambda tmp: tmp.write_bytes(payload))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:  # a file system without hard links (some FUSE, SMB): check, then rename
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV) or path.exists():
                raise
            os.replace(tmp, path)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def left_by_dead_writer(name: str) -> bool:
    """A `.tmp-<pid>-<host>-…` name whose writer is gone. A temp file tagged with another host is
    never judged: its pid says nothing about this machine."""
    parts = name.split("-")
    try:
        pid = int(parts[1])
    except (IndexError, ValueError):
        return False
    if len(parts) > 2 and _is_host_tag(parts[2]) and parts[2] != HOST_TAG:
        return False
    return not pid_alive(pid)


def clean_temp_files(directory: Path) -> int:
    """Remove `.tmp-<pid>-*` leftovers whose writing process is gone (crashed writers)."""
    removed = 0
    for tmp in directory.glob(".tmp-*"):
        if left_by_dead_writer(tmp.name):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
    return removed


class UnsafePath(ReplayError):
    """Something below a store's root that replay did not make and will not write through."""


def unusual(path: Path) -> str | None:
    """What `path` is if replay never makes such a thing (a link is not followed), else None."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"


def unusual_entries(root: Path) -> Iterator[tuple[Path, str]]:
    """Every unusual entry below `root`, in path order; links to directories are not descended."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            if what := unusual(Path(directory, name)):
                yield Path(directory, name), what


def refusal(path: Path, what: str) -> UnsafePath:
    return UnsafePath(f"refused: {path} is {what}; replay writes only regular files and directories "
                      "in a store and follows no link: remove it (`replay doctor` lists them all)")


def refuse_unusual(root: Path) -> None:
    """Before a write command: its reads must not leave the store either (a linked rollouts/round=R
    would be scored into this store) nor block (a FIFO part)."""
    if first := next(unusual_entries(root), None):
        raise refusal(*first)


def writable(root: Path, path: Path) -> Path:
    """`path` if no component of it below `root` is unusual: a linked directory would take the
    write (and the temp-file cleanup beside it) out of the store; a linked file, its target."""
    current = Path(root)
    for part in Path(path).relative_to(root).parts:
        current = current / part
        if what := unusual(current):
            raise refusal(current, what)
    return path


def open_lock(root: Path, path: Path) -> int:
    """A descriptor of the lock file `path`, created if missing. Its holder's name is written into
    it and truncated on release, so it must be the store's own regular file: O_NOFOLLOW refuses a
    link at `path` itself, `writable` one above it, fstat anything else (O_NONBLOCK: a FIFO opens
    without waiting for a writer, to be refused)."""
    writable(root, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refusal(path, unusual(path) or "a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refusal(path, unusual(path) or "not a regular file")
    return fd


class LocalStorage:
    """Writes for a store directory; reads use the Path objects themselves. Every write checks its
    path with `writable` first."""

    remote = False

    def __init__(self, root: Path):
        self.root = root

    def put(self, path: Path, payload: bytes) -> None:
        atomic_write_bytes(writable(self.root, path), payload)

    def put_if_absent(self, path: Path, payload: bytes) -> bool:
        return create_exclusive(writable(self.root, path), payload)

    def write_parquet(self, path: Path, table, **options) -> None:
        import pyarrow.parquet as pq  # not at import: the CLI's read commands run without pyarrow

        writable(self.root, path)  # before mkdir and the temp-file cleanup in its directory
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_temp_files(path.parent)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", **options))

    def attach(self, con) -> None:
        """Nothing to register: DuckDB reads local files itself."""

    def sql_roots(self) -> list[str]:
        return [str(self.root) + os.sep]
