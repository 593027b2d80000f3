"""Adapter directories in the store: which one a round starts from, atomic saving, local copies.

An adapter is complete when its marker, `adapter_config.json`, exists: locally the directory is
renamed into place whole; on S3 the marker is uploaded last (replay.storage.s3.S3Storage.upload_dir).
peft and vLLM need a local directory, so an adapter on S3 is downloaded once per process into a
cache directory named by its content (the objects' ETags), where a later process finds it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from schemas import MAIN_ADAPTER

from .storage import is_remote, resolve
from .storage.local import writable
from .store import Store, clean_temp_files, temp_name

MARKER = "adapter_config.json"
_LOCAL_COPIES: dict[str, Path] = {}


def exists(path: Path) -> bool:
    return (path / MARKER).exists()


def previous_adapter(store: Store, round: int, name: str = MAIN_ADAPTER) -> Path | None:
    """The adapter round `round` continues from: round-1's of the same name, else round-1's main one
    (the policy that sampled round `round`'s data), else None (a fresh LoRA)."""
    if round < 1:
        return None
    for candidate in (store.adapter_dir(round - 1, name), store.adapter_dir(round - 1)):
        if exists(candidate):
            return candidate
    return None


def save(model, out_dir: Path, manifest: dict) -> Path:
    """peft save_pretrained into a temp dir beside out_dir, then rename: never a half adapter.
    On S3: saved to a local temp dir, then uploaded with the marker last."""
    if is_remote(out_dir):
        with tempfile.TemporaryDirectory(prefix="replay-adapter-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            out_dir.storage.upload_dir(Path(tmp), out_dir, MARKER)
        return out_dir
    # no link from the store's root (above adapters/, Store.adapter_dir) down to out_dir: the save, the
    # temp-file cleanup beside it and --force's swap would all happen where the link leads
    writable(next((p.parent for p in out_dir.parents if p.name == "adapters"), out_dir.parent), out_dir)
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


def cache_root() -> Path:
    return Path(os.environ.get("REPLAY_CACHE", Path.home() / ".cache" / "replay")) / "adapters"


def local_copy(path: str | os.PathLike | None) -> str | None:
    """A local directory holding the adapter at `path` (a store path or URI): itself when local;
    for S3, a download keyed by the objects' ETags (their content), made once per process."""
    if path is None:
        return None
    root = resolve(path)
    if not is_remote(root):
        return str(root)
    if str(root) in _LOCAL_COPIES:
        return str(_LOCAL_COPIES[str(root)])
    objects = root.storage.list(root.key + "/", detail=True)
    names = {key[len(root.key) + 1:]: meta for key, meta in objects.items()}
    if MARKER not in names:
        raise FileNotFoundError(f"no peft adapter at {root} ({MARKER} missing)")
    digest = hashlib.sha256(json.dumps(sorted((n, m["etag"], m["size"]) for n, m in names.items())).encode())
    target = cache_root() / digest.hexdigest()[:24]
    if not (target / MARKER).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_temp_files(target.parent)
        tmp = target.parent / temp_name(uuid.uuid4().hex)
        try:
            root.storage.download_dir(root, tmp)
            try:
                os.rename(tmp, target)  # another process may have made the same copy: keep theirs
            except OSError:
                if not (target / MARKER).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _LOCAL_COPIES[str(root)] = target
    return str(target)
