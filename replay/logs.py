"""How loud a stage is: replay's own progress (replay.progress) and the heavy libraries' logs.

vLLM logs ~90 INFO lines per engine start and transformers draws a "Loading weights" bar; a user
of `replay generate` wants neither, so both stay at WARNING unless `--verbose`. The settings go
through environment variables because vLLM reads them at import time, in every process it
spawns; libraries already imported get their loggers set directly. A value the user exported
wins over these defaults.

Under a stage command, vLLM's log records (INFO and up, from every process it starts) and whatever
its engine processes write to stdout/stderr (C++ warnings, load bars, tracebacks) go to
`<store>/logs/vllm.log`; the terminal gets one line per ERROR record of this process (all of
vLLM's records with `--verbose`), and nothing once the command is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .progress import QUIET_ENV

VERBOSE_ENV = "REPLAY_VERBOSE"
ENGINE_LOG = "vllm.log"
_store: str | None = None  # the --store of the running stage command: its logs/ takes the engine's output
_interrupted = threading.Event()  # set by the command's SIGINT handler: nothing more for the terminal


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def library_log_environment(environ: dict | None = None) -> None:
    """Defaults for vLLM and transformers logging, WARNING unless REPLAY_VERBOSE=1."""
    env = os.environ if environ is None else environ
    loud = env.get(VERBOSE_ENV, "") not in ("", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO" if loud else "WARNING")
    env.setdefault("TRANSFORMERS_VERBOSITY", "info" if loud else "warning")
    if not loud:
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar


def apply_to_loaded_libraries() -> None:
    """For vLLM / transformers imported before the environment was set (e.g. tests in one process)."""
    level = logging.INFO if verbose() else logging.WARNING
    if "vllm" in sys.modules:
        name = os.environ.get("VLLM_LOGGING_LEVEL", "").upper()
        logging.getLogger("vllm").setLevel(name if name in logging.getLevelNamesMapping() else level)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if verbose() else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def output_settings(quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """--quiet / --verbose for the duration of one command (restored after: tests run many in one process)."""
    saved = {k: os.environ.get(k) for k in (QUIET_ENV, VERBOSE_ENV, "VLLM_LOGGING_LEVEL",
                                             "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    if quiet:
        os.environ[QUIET_ENV] = "1"
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    library_log_environment()
    apply_to_loaded_libraries()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def command_store(store: str | None) -> Iterator[None]:
    """The store whose logs/ receives the engine logs of this command (restored after)."""
    global _store
    saved, _store = _store, store
    _interrupted.clear()
    try:
        yield
    finally:
        _store = saved


def mark_interrupted() -> None:
    _interrupted.set()


def interrupted() -> bool:
    return _interrupted.is_set()


def engine_log_file() -> Path | None:
    """<store>/logs/vllm.log of the running stage command (None outside one, or if its logs/ is unusable)."""
    if _store is None:
        return None
    from .storage import log_dir, resolve

    try:
        directory = log_dir(resolve(_store))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ENGINE_LOG
        if path.is_symlink() or (path.exists() and not path.is_file()):
            return None  # appended to wherever it leads: not a place for logs (doctor names it)
    except Exception:  # noqa: BLE001 - no log file is no reason to stop a stage
        return None
    return path


class OneLine(logging.Formatter):
    """`vllm ERROR: <first line of the message>`: what the terminal shows of a record."""

    def format(self, record: logging.LogRecord) -> str:
        first = (record.getMessage().strip().splitlines() or [""])[0]
        return f"{record.name.split('.')[0]} {record.levelname}: {first}"


class ShownToUser(logging.Filter):
    """Records for the terminal: those of process `pid` only (an engine process's stderr is the log
    file, which has them already), none once the command is interrupted; `everywhere` (--verbose):
    every process's."""

    def __init__(self, pid: int = 0, everywhere: bool = False):
        super().__init__()
        self.pid, self.everywhere = pid, everywhere

    def filter(self, record: logging.LogRecord) -> bool:
        return not _interrupted.is_set() and (self.everywhere or os.getpid() == self.pid)


def vllm_logging_config(log_file: Path, loud: bool) -> dict:
    """A logging.config.dictConfig for vLLM's `vllm` logger in all its processes (its
    VLLM_LOGGING_CONFIG_PATH): INFO and up appended to `log_file`; ERROR and up (INFO with
    --verbose) as one line on stderr."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"file": {"format": "%(asctime)s %(processName)s pid=%(process)d %(levelname)s "
                                          "[%(filename)s:%(lineno)d] %(message)s"},
                       "line": {"()": "replay.logs.OneLine"}},
        "filters": {"user": {"()": "replay.logs.ShownToUser", "pid": os.getpid(), "everywhere": loud}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file), "encoding": "utf-8",
                              "formatter": "file", "level": "INFO"},
                     "user": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "line",
                              "level": "INFO" if loud else "ERROR", "filters": ["user"]}},
        "loggers": {"vllm": {"handlers": ["file", "user"], "level": "INFO", "propagate": False}},
    }


def open_log(log_file: Path) -> int:
    """An append descriptor of `log_file`, never through a link, and only of a regular file."""
    import stat

    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{log_file} is not a regular file")
    return fd


class OutputToLog:
    """While entered, this process's stdout and stderr descriptors (1 and 2) write to `log_file`:
    the processes started meanwhile (vLLM's engine core and its workers) inherit them and keep
    writing there for life. `restore()` gives this process its own back (once, from any thread)."""

    def __init__(self, log_file: Path):
        self.log_file = log_file
        self._saved: list[int] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "OutputToLog":
        fd = open_log(self.log_file)
        try:
            _flush_std()
            self._saved = [os.dup(1), os.dup(2)]
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        return self

    def restore(self) -> None:
        with self._lock:
            if self._saved is None:
                return
            saved, self._saved = self._saved, None
            _flush_std()
            for target, fd in zip((1, 2), saved):
                os.dup2(fd, target)
                os.close(fd)

    def __exit__(self, *exc) -> None:
        self.restore()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
