"""The `replay` command line. Thin: parse flags, call a stage or a report, print.

Heavy modules (torch, transformers, vLLM) are imported inside the commands that need them, so
`replay --help`, `replay sql` and `replay score` stay fast and torch-free.
"""

from __future__ import annotations

import functools
from inspect import Parameter, Signature, signature  # (a command below is named inspect)
from typing import Optional

import typer

from .cli_coerce import install as _plain_values_without_pydantic
from .errors import ReplayError

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
            from .logs import output_settings

            if long_running:  # before any torch import: OpenMP reads it when torch loads
                from .runtime import thread_environment

                thread_environment()

            try:
                with output_settings(quiet=kw.pop("quiet", False), verbose=kw.pop("verbose", False)):
                    return fn(*a, **kw)
            except ReplayError as exc:
                typer.echo(f"error: {_printable(str(exc))}", err=True)
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


def _printable(text: str) -> str:
    """Input quoted into a message may hold lone surrogates, which no UTF-8 stream can print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _open(store: str):
    from .store import Store

    return Store.open(store)


from . import cli_stages  # noqa: E402,F401  (registers generate, score, import, learn, round, eval)


@command(short_help="Run a read-only SQL query over the store's views.")
def sql(
    query: str = typer.Argument(..., help="A read-only SQL query over the store's views."),
    store: str = StoreOpt,
    format: Optional[str] = typer.Option(None, "--format", "-f", help="table | csv | json (one array) | jsonl "
                                         "(JSON Lines) | markdown | parquet (default: table, or from -o's extension)"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the result to this file."),
    allow_read: list[str] = typer.Option([], "--allow-read", help="Also allow reading files under PATH."),
):
    """Run one read-only SQL query (views: rollouts, verdicts, samples, groups, negative_groups,
    confident_mistakes, rescues, rounds, learn_audit, learn_metrics, eval_passk, rescue_eval, prompts,
    prompt_sets, stage_runs)."""
    from .render import fetcher, format_for, write_result

    opened = _open(store)
    if output:
        opened.refuse_inside(output, "--output")
    fmt = format_for(format, output)
    table = opened.read_only_query(query, allow_read, fetch=fetcher(fmt))
    # DuckDB names an unaliased count(*) column count_star(); show it as written
    names = ["count(*)" if c == "count_star()" else c for c in table.column_names]
    table = table.rename_columns(names)
    write_result(table, fmt, output)


@command(short_help="Canned reports: rounds, negatives, mistakes, a prompt.")
def inspect(
    what: str = typer.Argument(..., help="rounds | negatives | mistakes | prompt"),
    ident: Optional[str] = typer.Argument(None, help="Prompt id for `inspect prompt`."),
    store: str = StoreOpt,
    round: Optional[int] = typer.Option(None, "--round", "-r", help="Only this round."),
    limit: int = typer.Option(20, "--limit", "-n", help="At most this many rows."),
):
    """Canned reports: round summaries, negative groups, confident mistakes, one prompt's samples."""
    from .reports import inspect_report
    from .render import print_table

    title, rows = inspect_report(_open(store), what, ident, round, limit)
    print_table(rows, title=title)


@command()
def status(store: str = StoreOpt):
    """Per round: which stages are complete, and row counts."""
    from .reports import status_table
    from .render import print_table

    opened = _open(store)
    print_table(status_table(opened), title=f"store {opened.root}")


@command(short_help="Export scored rollouts (TRL rollout_func, JSONL).")
def export(
    store: str = StoreOpt,
    format: str = typer.Option("jsonl", "--format", "-f", help="trl (prompt_ids, completion_ids, logprobs) | jsonl"),
    out: str = typer.Option(..., "--out", "-o", help="Output file (.jsonl, or .parquet)."),
    round: Optional[int] = typer.Option(None, "--round", "-r", help="Only this round."),
):
    """Export scored rollouts for other tools (TRL's rollout_func contract, or plain JSONL)."""
    from stages.export import run

    n = run(store, format, out, round)
    typer.echo(f"wrote {n} rollouts to {out}")


@command(short_help="Plots and one self-contained HTML report.")
def report(
    store: str = StoreOpt,
    out: str = typer.Option("replay-report", "--out", "-o", help="Directory for index.html and the PNG plots."),
    compare: list[str] = typer.Option([], "--compare", help="Another store to compare with (repeatable); "
                                      "each store is labelled by its directory name."),
):
    """Plots (PNG) and one self-contained HTML page: pass@k, group kinds, rescues, confidence of
    wrong answers, learn metrics; --compare adds pass@k and negative share across stores."""
    from .report import write_report

    paths = write_report(store, out, compare)
    typer.echo(f"wrote {paths[-1]} ({len(paths) - 1} plot(s))")


@command(short_help="Check the store's files, keys and manifests.")
def doctor(
    store: str = StoreOpt,
    deep: bool = typer.Option(False, "--deep", help="Also decompress every data page (reads all the data)."),
):
    """Check the store: every Parquet file opens and matches its schema, no duplicate keys,
    every verdict has its rollout, groups are complete, manifests agree with the files, adapters load.
    Prints each problem with its file path; exit 1 on any error."""
    from .doctor import diagnose

    result = diagnose(store, deep=deep)
    for problem in result.problems:
        typer.echo(_printable(str(problem)))
    if result.errors:
        raise ReplayError(f"{len(result.errors)} error(s) in the store at {result.root}")
    typer.echo(result.summary())


def main() -> None:
    app()

