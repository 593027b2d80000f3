"""The Typer app and what every command shares: the `command` decorator (error policy, output
options) and the --store option. The commands live beside it (stage_commands, read_commands).
"""

from __future__ import annotations

import functools
from inspect import Parameter, Signature, signature

import typer

from ..errors import ReplayError
from .coerce import install as _plain_values_without_pydantic

_plain_values_without_pydantic()
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Offline replay RLVR: keep every rollout, query failures with SQL, rescue negative groups.")

StoreOpt = typer.Option("replay-store", "--store", envvar="REPLAY_STORE",
                        help="Store directory (default: $REPLAY_STORE or ./replay-store).")


def command(*args, long_running: bool = False, **kwargs):
    """app.command plus the error policy: a ReplayError is one line on stderr and exit 1.
    long_running adds --quiet (no progress) and --verbose (engine logs at INFO) to the command."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            from ..logs import output_settings

            if long_running:  # before any torch import: OpenMP reads it when torch loads
                from ..runtime import thread_environment

                thread_environment()

            try:
                with output_settings(quiet=kw.pop("quiet", False), verbose=kw.pop("verbose", False)):
                    return fn(*a, **kw)
            except ReplayError as exc:
                typer.echo(f"error: {printable(str(exc))}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                typer.echo("interrupted: rerun the same command to resume", err=True)
                raise typer.Exit(130) from None

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


def printable(text: str) -> str:
    """Input quoted into a message may hold lone surrogates, which no UTF-8 stream can print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def open_store(store: str):
    from ..store import Store

    return Store.open(store)
