"""The per-group summary: `group_summary/round=R/part-<fingerprint>.parquet`, one row per round x prompt.

The failure-group views (`groups`, `negative_groups`, `rounds`, `rescues`) need a handful of numbers
per group; computing them from the rows means reading every rollout and verdict of the store (seconds
at 10 M rollouts). `replay score` writes them once per round, beside the verdicts, computed by the
`group_summary_raw` view (the one definition of those numbers).

A summary is exact by construction, not by writer discipline: its file is named by a fingerprint of
the round's rollout and verdict files (names and sizes) it was computed from, and a reader uses it
only while those files are unchanged. A re-score, a shard's verdicts, a late generate or import, a
writer killed between its verdicts and its summary: each changes the fingerprint, and the views then
aggregate that round's rows until the next `replay score` of the round writes a current summary.
Stores written before the summary existed work the same way (`replay doctor` says how to backfill).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StoreError
from .storage import is_remote

if TYPE_CHECKING:  # a Store is passed in; importing store here would close a cycle (store -> summary)
    from .store import Store

TABLE = "group_summary"
INPUTS = ("rollouts", "verdicts")  # the tables a round's summary is computed from
STALE_GRACE_S = 600  # an outdated summary file is deleted only this long after it was replaced


def fingerprint(store: Store, round: int) -> str:
    """A hash of the names and sizes of the round's rollout and verdict part files."""
    digest = hashlib.sha256()
    for table in INPUTS:
        directory = store.root / table / f"round={int(round)}"
        try:
            names = sorted(n for n in os.listdir(directory) if n.startswith("part-") and n.endswith(".parquet"))
        except FileNotFoundError:
            names = []
        for name in names:
            try:
                size = os.stat(directory / name).st_size
            except FileNotFoundError:  # replaced while listed: the next look sees the new file
                size = -1
            digest.update(f"{table}/{name}:{size}\n".encode())
    return digest.hexdigest()[:32]


def current_path(store: Store, round: int, fp: str | None = None) -> Path:
    return store.root / TABLE / f"round={int(round)}" / f"part-{fp or fingerprint(store, round)}.parquet"


def rollout_rounds(store: Store) -> list[int]:
    rounds = []
    for path in (store.root / "rollouts").glob("round=*"):
        try:
            rounds.append(int(path.name.split("=", 1)[1]))
        except ValueError:
            continue
    return sorted(rounds)


def split_rounds(store: Store) -> tuple[dict[int, Path], list[int]]:
    """({round: its current summary file}, [rounds without one]) over the rounds that have rollouts."""
    fresh, stale = {}, []
    if is_remote(store.root):  # object stores: no summaries yet (fingerprints read local directories)
        return fresh, rollout_rounds(store)
    for round in rollout_rounds(store):
        path = current_path(store, round)
        if path.is_file():
            fresh[round] = path
        else:
            stale.append(round)
    return fresh, stale


def view_source(store: Store) -> str:
    """SQL of the `group_summary` view: current summary files, and the raw aggregation for the rest."""
    import schemas

    names = [c.name for c in schemas.COLUMNS[TABLE]]
    cols = ", ".join(f'"{n}"' for n in names)
    fresh, stale = split_rounds(store)
    parts = []
    if fresh:
        listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in fresh.values())
        parts.append(f"SELECT {cols} FROM read_parquet([{listed}], hive_partitioning = true, "
                     "hive_types = {'round': INTEGER})")
    if stale or not parts:
        # literal rounds, so that the scans below prune the other rounds' files by their directory
        rounds = ", ".join(str(r) for r in stale) or "NULL"
        parts.append(f"SELECT {cols} FROM group_summary_raw WHERE round IN ({rounds})")
    return " UNION ALL ".join(parts)


def refresh(store: Store, round: int, attempts: int = 5) -> Path | None:
    """Write the round's summary unless a current one exists; returns its path (None: no rollouts).

    Concurrent writers (shards finishing together) may each write one; the fingerprint is checked
    after the write, so a summary whose inputs changed while it was computed is removed, not kept."""
    if is_remote(store.root):
        return None
    for _ in range(attempts):
        fp = fingerprint(store, round)
        path = current_path(store, round, fp)
        if path.is_file():
            _remove_outdated(path)
            return path
        con = store.connect(names={"group_summary_raw"})  # not every round's fingerprint
        try:
            rows = con.sql("SELECT * FROM group_summary_raw WHERE round = ?", params=[round]).to_arrow_table()
        finally:
            con.close()
        if rows.num_rows == 0:
            return None
        written = store.write(TABLE, rows, round=round, name=fp)
        if fingerprint(store, round) == fp:
            _remove_outdated(written)
            return written
        written.unlink(missing_ok=True)  # computed from files that changed meanwhile: try again
    raise StoreError(f"round {round}: its rollout or verdict files kept changing while the group summary "
                     f"was computed; rerun `replay score --round {round}` when the writers are done")


def _remove_outdated(current: Path) -> None:
    # a reader that listed an older summary a moment ago may still open it: keep them a while
    cutoff = time.time() - STALE_GRACE_S
    for path in current.parent.glob("part-*.parquet"):
        try:
            if path != current and path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass


# -- doctor -----------------------------------------------------------------------------------
COMPARE = ("rollouts", "sum_tokens", "n_tokens", "policy_round", "n", "n_correct", "kind")
COMPARE_FLOAT = ("pass_rate", "mean_confidence", "mean_wrong_confidence")


def check(store: Store) -> list[tuple[Path, str, str]]:
    """(path, message, severity) for each current summary that disagrees with the rows it claims to
    summarise (error), and each round with verdicts but no current summary (warning)."""
    if is_remote(store.root):
        return []
    fresh, stale = split_rounds(store)
    problems = []
    con = store.connect()
    try:
        for round, path in sorted(fresh.items()):
            listed = "'" + str(path).replace("'", "''") + "'"
            equal = " AND ".join(f"s.{c} IS NOT DISTINCT FROM r.{c}" for c in COMPARE)
            close = " AND ".join(f"(s.{c} IS NULL AND r.{c} IS NULL OR abs(s.{c} - r.{c}) <= 1e-9 * "
                                 f"greatest(1, abs(r.{c})))" for c in COMPARE_FLOAT)
            bad, example = con.execute(
                f"SELECT count(*), min(coalesce(s.prompt_id, r.prompt_id)) FROM read_parquet({listed}) s "
                f"FULL JOIN (SELECT * FROM group_summary_raw WHERE round = ?) r ON s.prompt_id = r.prompt_id "
                f"WHERE NOT ({equal} AND {close})", [round]).fetchone()
            if bad:
                problems.append((path, f"group summary of round {round} disagrees with its rollouts and verdicts "
                                       f"in {bad} group(s), e.g. prompt_id {example}: the failure-group views "
                                       f"answer wrongly; delete this file and run `replay score --round {round}`",
                                 "error"))
        scored = {r for (r,) in con.execute("SELECT DISTINCT round FROM verdicts").fetchall()}
        for round in sorted(set(stale) & scored):
            problems.append((store.root / TABLE / f"round={round}",
                             f"round {round} has no current group summary (written before summaries existed, "
                             f"or rows were added since): its failure-group queries read every row; "
                             f"`replay score --round {round}` writes it", "warning"))
    finally:
        con.close()
    return problems
