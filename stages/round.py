"""`replay round`: one cron tick — the next unfinished round's missing stages, under a store lock.

The next round is the first one whose learn manifest is not complete. Each stage is idempotent
and resumable, so a tick killed at any moment is finished by the next one: generate skips stored
groups, score skips scored rollouts, learn skips a complete round and replaces its own partial
outputs. Only one tick works on a store at a time: flock on <store>/.round.lock, or on an s3://
store a lease object of that name taken by conditional write (replay.storage.s3_lease.S3Lease).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas import MAIN_ADAPTER, learn_stage

from replay.errors import ReplayError
from replay.storage import is_remote, log_dir, resolve
from replay.storage.local import open_lock, refuse_unusual
from replay.store import Store

LOCK_FILE = ".round.lock"
EXIT_LOCKED = 0  # a tick that finds another tick running is not an error for cron
# an s3 lease not renewed for this long is stale (its holder renews every third of it while alive)
LEASE_SECONDS = float(os.environ.get("REPLAY_LEASE_SECONDS", 300))


class RoundLocked(Exception):
    def __init__(self, holder: str):
        super().__init__(f"another round is running on this store ({holder}); this tick does nothing")
        self.holder = holder


@dataclass
class RoundSettings:
    """The [round] table: settings of the tick itself."""

    report_to: str = "none"  # live metrics of every stage (replay.metrics_sink); [learn] report_to wins for learn


@dataclass
class RoundResult:
    round: int
    stages: dict  # stage -> manifest record


@contextlib.contextmanager
def store_lock(root: Path, wait: bool = False) -> Iterator[None]:
    if is_remote(root):
        from replay.storage.s3_lease import LeaseHeld

        lease = root.storage.lease(LOCK_FILE, LEASE_SECONDS)
        try:
            lease.acquire(wait=wait)
        except LeaseHeld as exc:
            raise RoundLocked(exc.holder) from None
        with lease:
            yield
        if lease.lost.is_set():  # our renewals failed past the ttl and another tick took the lease
            raise ReplayError(f"the round lease {lease.path} was taken over while this tick ran (it could not "
                              f"renew it for {LEASE_SECONDS:.0f} s): another tick may have run the same stages")
        return
    refuse_unusual(root)  # before the lock and rounds.log are written: no link or FIFO in the store
    fd = open_lock(root, root / LOCK_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown holder"
            raise RoundLocked(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the kernel also releases it if we are killed


def next_round(store: Store, adapter_name: str = MAIN_ADAPTER) -> int:
    stage = learn_stage(adapter_name)
    r = 0
    while (m := store.read_manifest(r, stage)) and m.get("status") == "complete":
        r += 1
    return r


def _logger(root: Path) -> logging.Logger:
    log_dir(root).mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"replay.round.{root}")
    if not log.handlers:
        handler = logging.FileHandler(log_dir(root) / "rounds.log")
        handler.setFormatter(logging.Formatter("%(asctime)s pid=%(process)d %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return log


def check_settings(settings: dict[str, dict]) -> None:
    """Every stage's config of a tick, built and checked before the first stage runs: a bad [learn] or
    [score] value fails the tick at once, not after generate (and score) did their work."""
    from replay.metrics_sink import check_report_to
    from stages import generate, learn, score

    report_to = RoundSettings(**settings.get("round", {})).report_to
    check_report_to(report_to)
    generate.GenerateConfig(**settings.get("generate", {})).validate()
    score.ScoreConfig(**settings.get("score", {})).validate()
    learn_cfg = learn.LearnConfig(**({"report_to": report_to} | settings.get("learn", {})))
    learn_cfg.validate()
    check_report_to(learn_cfg.report_to)


def run_one(store_path: str, settings: dict[str, dict], echo=print) -> RoundResult:
    from stages import generate, learn, score

    root = resolve(store_path)
    gen_cfg = generate.GenerateConfig(**settings.get("generate", {}))
    # logs live in a store: on a new path they start once generate has made it (a refused tick leaves none)
    log = _logger(root) if (root / "store.json").exists() else None
    learn_cfg_fields = settings.get("learn", {})
    # a new store is created by generate, which records the base model in store.json
    r = next_round(Store.open(root), learn_cfg_fields.get("adapter_name", MAIN_ADAPTER)) if (root / "store.json").exists() else 0
    if log:
        log.info("round %d: start", r)
    records = {}
    gen_cfg.round = r
    records["generate"] = generate.run(str(root), gen_cfg)
    if log is None:
        log = _logger(root)
        log.info("round %d: start", r)
    log.info("round %d: generate %s", r, records["generate"]["counts"])
    echo(f"round {r}: generate {records['generate']['counts']}")
    records["score"] = score.run(str(root), score.ScoreConfig(round=r, **settings.get("score", {})))
    log.info("round %d: score %s", r, records["score"]["counts"])
    echo(f"round {r}: score {records['score']['counts']}")
    report_to = RoundSettings(**settings.get("round", {})).report_to
    log_round_metrics(report_to, root, r)
    learn_cfg = learn.LearnConfig(round=r, **({"report_to": report_to} | learn_cfg_fields))
    records["learn"] = learn.run(str(root), learn_cfg)
    log.info("round %d: learn %s", r, records["learn"]["counts"])
    echo(f"round {r}: learn {records['learn']['counts']} -> {records['learn'].get('adapter')}")
    return RoundResult(r, records)


def round_metrics(store: Store, round: int) -> dict:
    """Accuracy, group shares and rescues of one scored round (the `rounds` view)."""
    rows = store.query("SELECT * FROM rounds WHERE round = ?", [round]).to_pylist()
    if not rows or not rows[0]["scored"]:
        return {}
    r = rows[0]
    groups = r["negative_groups"] + r["mixed_groups"] + r["positive_groups"]
    return {"accuracy": r["accuracy"], "negative_share": r["negative_groups"] / groups,
            "mixed_share": r["mixed_groups"] / groups, "positive_share": r["positive_groups"] / groups,
            "rescued": r["rescued"], "mean_wrong_confidence": r["mean_wrong_confidence"],
            "mean_tokens": r["mean_tokens"]}


def log_round_metrics(report_to: str, root: Path, round: int) -> None:
    if report_to != "none":
        from replay.metrics_sink import log_once

        log_once(report_to, root, "rounds", round, round_metrics(Store.open(root), round))


def run(store_path: str, settings: dict[str, dict], rounds: int = 1, wait: bool = False,
        echo=print, until: int | None = None) -> list[RoundResult]:
    """Run `rounds` rounds in a row under the store lock; raises RoundLocked if another tick runs.

    With `until`, run rounds until round `until` has learned instead (none if it already has), so
    a rerun script asks for a target rather than a count that would overshoot after a restart."""
    if until is not None and until < 0:
        raise ReplayError(f"--until must be a round number (0 or more), got {until}")
    root = resolve(store_path)
    adapter_name = settings.get("learn", {}).get("adapter_name", MAIN_ADAPTER)
    if not is_remote(root) and root.exists():
        refuse_unusual(root)  # a link or FIFO in the store is named before anything else is said
    check_settings(settings)
    results = []
    fresh, held = not is_remote(root) and not root.exists(), False
    try:
        with store_lock(root, wait=wait):
            held = True
            while _wants_another(root, adapter_name, len(results), rounds, until):
                results.append(run_one(str(root), settings, echo))
    finally:
        if fresh and held and not (root / "store.json").exists():  # refused before generate made the store
            _leave_no_trace(root)
    return results


def _leave_no_trace(root: Path) -> None:
    """A tick that failed before its store existed removes what it made there: the round lock (released by
    now; no store means no other tick has work there) and the directory, if nothing else is in it."""
    with contextlib.suppress(FileNotFoundError):
        (root / LOCK_FILE).unlink()
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty


def _wants_another(root: Path, adapter_name: str, done: int, rounds: int, until: int | None) -> bool:
    if until is None:
        return done < rounds
    return not (root / "store.json").exists() or next_round(Store.open(root), adapter_name) <= until
