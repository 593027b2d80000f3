"""The Typer app and what every command shares: the `command` decorator (error policy, output
options) and the --store option. The commands live beside it (stage_commands, read_commands).
"""

from __future__ import annotations

import contextlib
import errno
import functools
from inspect import Parameter, Signature, signature

import typer

from ..errors import ReplayError
from .coerce import install as _plain_values_without_pydantic

_plain_values_without_pydantic()
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Offline replay RLVR: keep every rollout, query failures with SQL, rescue negative groups.")

def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"replay {version('replay-rlvr')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("replay (not installed)")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print replay's version and exit.")) -> None:
    """Offline replay RLVR: keep every rollout, query failures with SQL, rescue negative groups."""


StoreOpt = typer.Option("replay-store", "--store", envvar="REPLAY_STORE",
                        help="Store directory (default: $REPLAY_STORE or ./replay-store).")


def command(*args, long_running: bool = False, **kwargs):
    """app.command plus the error policy: a ReplayError is one line on stderr and exit 1.
    long_running adds --quiet (no progress) and --verbose (engine logs at INFO) to the command."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            from ..logs import command_store, output_settings

            if long_running:  # before any torch import: OpenMP reads it when torch loads
                from ..runtime import thread_environment

                thread_environment()

            store = kw.get("store")
            try:
                with output_settings(quiet=kw.pop("quiet", False), verbose=kw.pop("verbose", False)), \
                        command_store(store if long_running else None), _noting_interrupts(long_running):
                    return fn(*a, **kw)
            except ReplayError as exc:
                typer.echo(f"error: {printable(str(exc))}", err=True)
                raise typer.Exit(1) from None
            except OSError as exc:  # a full or read-only file system below a write no stage expected to fail
                if exc.errno not in _FILE_SYSTEM_ERRORS:
                    raise
                typer.echo(f"error: {printable(os_error_line(exc, store))}", err=True)
                raise typer.Exit(1) from None
            except NotImplementedError as exc:  # pyarrow: a result column Parquet has no type for
                if not (type(exc).__module__.startswith("pyarrow") and "Parquet" in str(exc)):
                    raise
                typer.echo(f"error: the result cannot be written as Parquet ({printable(str(exc))}): cast that "
                           "column, e.g. CAST(x AS VARCHAR), or choose another --format", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt as exc:
                typer.echo("interrupted: rerun the same command to resume", err=True)
                raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

        if long_running:
            wrapper.__signature__ = _with_output_options(signature(fn))
        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _with_output_options(sig: Signature) -> Signature:
    extra = [Parameter("quiet", Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
                 False, "--quiet", "-q", help="No progress output (bars on a terminal, lines in a log).")),
             Parameter("verbose", Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
                 False, "--verbose", help="Show the INFO logs of vLLM and transformers."))]
    params = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in sig.parameters.values()]
    return sig.replace(parameters=params + extra)


_FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
_FILE_SYSTEM_HINTS = {errno.ENOSPC: "the file system is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EROFS: "the file system is read-only"}


def os_error_line(exc: OSError, store: str | None) -> str:
    """One line for an OSError: the file it names (else the store being written), what went wrong, and
    that a rerun resumes (writes are atomic: nothing half-written is left in a store)."""
    where = exc.filename if exc.filename is not None else (f"store {store}" if store else "a file")
    hint = _FILE_SYSTEM_HINTS.get(exc.errno)
    if not hint:  # permission denied, an I/O error: maybe a read
        return f"{where}: {exc.strerror or exc}"
    return (f"cannot write {where}: {exc.strerror or exc} ({hint}); the store's files are whole (writes are "
            "atomic): rerun the same command once it is fixed")


@contextlib.contextmanager
def _noting_interrupts(stage: bool = False):
    """SIGINT raises KeyboardInterrupt as ever, after noting it (replay.logs.interrupted): the engine
    log lines and failures that follow from it then stay off the terminal."""
    import signal
    import threading

    from ..logs import mark_interrupted

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def handler(signum, frame):
        mark_interrupted()
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    # for a stage, SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C: locks, verifier pools and
    # engines are closed by their `with` blocks instead of being left to init as orphans and zombies
    terminate = stage and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # `replay sql` has its own
    signal.signal(signal.SIGINT, handler)
    if terminate:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that the command unwinds as for Ctrl-C."""


def printable(text: str) -> str:
    """Input quoted into a message may hold lone surrogates, which no UTF-8 stream can print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def open_store(store: str):
    from ..store import Store

    return Store.open(store)
