"""The read-only commands: sql, inspect, status, export, report, doctor. They never import torch
(but `export --format adapter|merged`, which loads a tokenizer and merges weights)."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import ReplayError
from .app import StoreOpt, command, open_store, printable

@command(short_help="Run a read-only SQL query over the store's views.")
def sql(
    query: str = typer.Argument(..., help="A read-only SQL query over the store's views."),
    store: str = StoreOpt,
    format: Optional[str] = typer.Option(None, "--format", "-f", help="table | csv | json (one array) | jsonl "
                                         "(JSON Lines) | markdown | parquet (default: table, or from -o's extension)"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the result to this file "
                                         "(- for stdout; a FIFO or device is written in place, a missing "
                                         "directory is not created)."),
    allow_read: list[str] = typer.Option([], "--allow-read", help="Also allow reading files under PATH."),
    timeout: float = typer.Option(60.0, "--timeout", help="Stop the query after this many seconds "
                                  "(0: no limit)."),
    memory_limit: str = typer.Option("2GB", "--memory-limit", help="DuckDB's memory for the query; "
                                     "past it, sorts and joins spill to a private temp directory."),
    max_temp_size: str = typer.Option("10GB", "--max-temp-size", help="At most this much spilled to disk."),
):
    """Run one read-only SQL query (views: rollouts, verdicts, samples, groups, negative_groups,
    confident_mistakes, rescues, rounds, learn_audit, learn_metrics, eval_passk, rescue_eval, prompts,
    prompt_sets, stage_runs). SHOW TABLES lists them, DESCRIBE <view> shows its columns; settings
    are not readable. --timeout, --memory-limit and --max-temp-size bound a runaway query."""
    from ..read.formats import fetcher, format_for, output_target, write_result

    if timeout < 0:  # checked here, not by Typer's bounds: those import pydantic (start-up time)
        raise ReplayError(f"--timeout {timeout:g}: give seconds, or 0 for no limit")
    opened = open_store(store)
    if output and output != "-":
        opened.refuse_inside(output, "--output")
    fmt = format_for(format, output)
    output_target(output)  # refuse a directory or a missing one before the query runs
    table = opened.read_only_query(query, allow_read, fetch=fetcher(fmt), timeout=timeout or None,
                                   memory_limit=memory_limit, max_temp_size=max_temp_size)
    # DuckDB names an unaliased count(*) column count_star(); show it as written
    names = ["count(*)" if c == "count_star()" else c for c in table.column_names]
    table = table.rename_columns(names)
    write_result(table, fmt, output)


@command(short_help="Canned reports: rounds, negatives, mistakes, a prompt.")
def inspect(
    what: str = typer.Argument(..., help="rounds | negatives | mistakes | prompt | rescuable | rescue | hints"),
    ident: Optional[str] = typer.Argument(None, help="Prompt id for `inspect prompt`."),
    store: str = StoreOpt,
    round: Optional[int] = typer.Option(None, "--round", "-r", help="Only this round."),
    limit: int = typer.Option(20, "--limit", "-n", help="At most this many rows."),
):
    """Canned reports: round summaries, negative groups, confident mistakes, one prompt's samples, the
    negative groups a replay could rescue (rescuable), the groups it did rescue (rescue), hint sets (hints)."""
    from ..read.inspect import inspect_report
    from ..read.formats import print_table

    title, rows = inspect_report(open_store(store), what, ident, round, limit)
    print_table(rows, title=title)


@command()
def status(store: str = StoreOpt):
    """Per round: which stages are complete, and row counts."""
    from ..read.inspect import status_table
    from ..read.formats import print_table

    opened = open_store(store)
    print_table(status_table(opened), title=f"store {opened.root}")


@command(short_help="Export rollouts (TRL, JSONL) or a round's adapter (peft, merged).")
def export(
    store: str = StoreOpt,
    format: str = typer.Option("jsonl", "--format", "-f", help="trl (prompt_ids, completion_ids, logprobs) | jsonl "
                               "| adapter (peft LoRA + tokenizer + README) | merged (base + adapter, merged weights)"),
    out: str = typer.Option(..., "--out", "-o", help="Output file (.jsonl; .parquet for --format trl; - for "
                            "stdout); for adapter|merged a directory outside the store, new or empty (a previous "
                            "export of the same format there is replaced)."),
    round: Optional[int] = typer.Option(None, "--round", "-r", help="Only this round (adapter|merged: the learn "
                                        "round whose adapter to export; required)."),
    adapter_name: str = typer.Option("main", "--adapter-name", help="adapter|merged: which adapter of the round "
                                     "(a side adapter of `learn --adapter-name`)."),
):
    """Export scored rollouts for other tools (TRL's rollout_func contract, or plain JSONL), or a
    round's adapter as a self-describing directory: the peft adapter with the base model named
    portably (adapter), or the merged weights (merged); each with the tokenizer and its chat template,
    and a README.md with the code that loads it in transformers and vLLM."""
    from ..read.export import run
    from ..read.formats import output_target

    if format in ("adapter", "merged"):
        from ..read.export_model import run as export_model

        written = export_model(store, format, out, round, adapter_name)
        typer.echo(printable(f"wrote the {format} export of round {round} ({adapter_name}) to {written}"))
        return
    if adapter_name != "main":
        raise ReplayError("--adapter-name applies to --format adapter or merged")
    n = run(store, format, out, round)
    to_stdout = output_target(out)[0] == "stdout"  # `-` or /dev/stdout: the message stays out of the data
    typer.echo(f"wrote {n} rollouts to {'stdout' if to_stdout else out}", err=to_stdout)


@command(short_help="Plots and one self-contained HTML report.")
def report(
    store: str = StoreOpt,
    out: str = typer.Option("replay-report", "--out", "-o", help="Directory for index.html and the PNG plots."),
    compare: list[str] = typer.Option([], "--compare", help="Another store to compare with (repeatable); "
                                      "each store is labelled by its directory name."),
):
    """Plots (PNG) and one self-contained HTML page: pass@k, group kinds, rescues, confidence of
    wrong answers, learn metrics; --compare adds pass@k and negative share across stores, and for
    stores named <arm>-s<seed> (examples/rescue_tournament.sh) the arms side by side, seeds pooled."""
    from ..read.report import write_report

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
    from ..read.doctor import diagnose

    result = diagnose(store, deep=deep)
    for problem in result.problems:
        typer.echo(printable(str(problem)))
    if result.errors:
        raise ReplayError(f"{len(result.errors)} error(s) in the store at {result.root}")
    typer.echo(result.summary())
