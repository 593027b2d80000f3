"""Adapter directories in the store: which one a round starts from, and atomic saving."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .store import Store, clean_temp_files, temp_name


def exists(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


def previous_adapter(store: Store, round: int, name: str = "main") -> Path | None:
    """The adapter round `round` continues from: round-1's of the same name, else round-1's main one
    (the policy that sampled round `round`'s data), else None (a fresh LoRA)."""
    if round < 1:
        return None
    for candidate in (store.adapter_dir(round - 1, name), store.adapter_dir(round - 1)):
        if exists(candidate):
            return candidate
    return None


def save(model, out_dir: Path, manifest: dict) -> Path:
    """peft save_pretrained into a temp dir beside out_dir, then rename: never a half adapter."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out_dir.parent)
    tmp = out_dir.parent / temp_name(uuid.uuid4().hex)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    old = None
    if out_dir.exists():  # --force: swap the old one out, then delete it
        old = out_dir.parent / temp_name(f"old-{uuid.uuid4().hex}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
