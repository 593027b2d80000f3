"""Live metrics (`--report-to none|tensorboard|wandb`): scalars streamed while a stage runs.

The Parquet tables stay the record; a sink only mirrors numbers to a dashboard as they happen.
One interface, `log(step, metrics)` + `close()`, so stages never know which backend is on:

- tensorboard: event files under `<store>/logs/tb/<run>/` (written with the `tensorboard`
  package's own event writer: no torch, so score/round-level metrics stay torch-free);
- wandb: a W&B run named `<store>/<run>` in group `<store>`, honouring W&B's environment
  (WANDB_MODE=offline, WANDB_DIR, WANDB_PROJECT; project "replay" by default).

Run names say what the steps count: `learn-<adapter>-r<R>` (optimizer steps of one learn),
`eval-<adapter>` and `rounds` (step = round). Both backends are optional extras
(`pip install replay-rlvr[tensorboard]` / `[wandb]`); choosing one that is not installed is a
clear error before any work starts.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Protocol

from .errors import ReplayError
from .storage import log_dir, resolve

REPORT_TO = ("none", "tensorboard", "wandb")
_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics row (strings, ids and None dropped; bools as 0/1)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class NullSink:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink:
    """One event file per sink; every log() is flushed, so TensorBoard shows it at once."""

    def __init__(self, logdir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self._writer = EventFileWriter(str(logdir))

    def log(self, step: int, metrics: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(metrics).items()]
        if values:
            self._writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, store_root: Path, run: str, config: dict | None):
        import wandb

        store = store_root.name
        # a stable id per (store, run): the `rounds` run of a cron loop continues across ticks
        run_id = hashlib.sha256(f"{store_root}/{run}".encode()).hexdigest()[:16]
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "replay"), name=f"{store}/{run}",
                               group=store, id=run_id, resume="allow", config=config or {},
                               reinit="create_new")

    def log(self, step: int, metrics: dict) -> None:
        values = scalars(metrics)
        if values:
            self._run.log(values, step=int(step))

    def close(self) -> None:
        self._run.finish()


def check_report_to(report_to: str) -> None:
    """Fail before any work when the choice is unknown or its package is missing."""
    if report_to not in REPORT_TO:
        raise ReplayError(f"--report-to {report_to!r}: use one of {', '.join(REPORT_TO)}")
    if report_to != "none":
        import importlib.util

        if importlib.util.find_spec(report_to) is None:
            raise ReplayError(f"--report-to {report_to}: the {report_to} package is not installed "
                              f"(pip install 'replay-rlvr[{_EXTRA[report_to]}]')")


def open_sink(report_to: str, store_root: str | Path, run: str, config: dict | None = None) -> MetricsSink:
    check_report_to(report_to)
    if report_to == "none":
        return NullSink()
    root = resolve(store_root)
    if report_to == "tensorboard":
        return TensorBoardSink(log_dir(root) / "tb" / run)  # under the store, or the local cache for s3://
    if report_to == "wandb":
        return WandbSink(root, run, config)
    return NullSink()


def log_once(report_to: str, store_root: str | Path, run: str, step: int, metrics: dict) -> None:
    """Open, log one step, close: for per-round numbers (eval pass@k, group shares)."""
    if report_to == "none":
        return
    sink = open_sink(report_to, store_root, run)
    try:
        sink.log(step, metrics)
    finally:
        sink.close()
