"""Where a store lives: a local directory or `s3://bucket/prefix`, behind one small interface.

`resolve(uri)` gives the store's root: a `pathlib.Path` for a local store, an `S3Path` for S3. Both
read the same way (`/`, `exists`, `glob`, `read_text`, `open("rb")`), so code that only reads paths
does not care where the store is. Writes go through `storage_of(root)`:
  put(path, bytes)            atomic replace (local: temp + fsync + rename; S3: one PUT)
  put_if_absent(path, bytes)  create once, False if it exists (local: link(2); S3: If-None-Match)
  write_parquet(path, table)  a part file that appears whole or not at all
  attach(con)                 let a DuckDB connection read the store (S3: a confined file system)
  sql_roots()                 what `allowed_directories` gets for user SQL
  lease(name, ttl)            (S3 only) an expiring lock object taken by conditional write
Any other URI scheme is refused: a store silently written to a local `s3:/...` directory is lost.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ReplayError
from .local import LocalStorage, writable

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")


_REMOTE = {"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "http", "https", "r2", "file"}


class StorageError(ReplayError):
    """A store location that replay cannot serve."""


def resolve(uri: str | os.PathLike):
    """The root of the store at `uri`: Path for a local path (or file://), S3Path for s3://."""
    if not isinstance(uri, (str, os.PathLike)):  # an S3Path: rooted at itself (an eval store in a store)
        if uri.key == uri.storage.prefix:
            return uri
        return type(uri.storage)(uri.storage.bucket, uri.key).root
    text = os.fspath(uri)
    match = _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    # `name://…` is a URI; `s3:bucket/…` (one slash lost by a shell or Path) is a mistyped one, not a
    # directory name; a colon elsewhere (`runs:2024`) is an ordinary local name
    if match and (match.group(2) or scheme in _REMOTE):
        if scheme == "file" and match.group(2):
            return Path(text[len("file://"):]).absolute()
        if scheme in ("s3", "s3a") and match.group(2):
            from .s3 import S3Storage

            bucket, _, prefix = text[match.end():].partition("/")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise StorageError(f"{text}: {bucket!r} is not an S3 bucket name (s3://bucket/prefix)")
            if any(part in (".", "..") for part in prefix.split("/")):
                raise StorageError(f"{text}: '.' and '..' are not allowed in an S3 prefix")
            return S3Storage(bucket, "/".join(p for p in prefix.split("/") if p)).root
        if scheme in ("s3", "s3a"):
            raise StorageError(f"--store {text}: an S3 store is written s3://bucket/prefix (two slashes)")
        hint = (" (Google Cloud Storage: use its S3-compatible endpoint, AWS_ENDPOINT_URL=https://storage.googleapis.com "
                "with HMAC keys, and an s3:// URI)") if scheme in ("gs", "gcs") else ""
        raise StorageError(f"--store {text}: replay serves local paths and s3://bucket/prefix, not {scheme}://{hint}")
    return Path(text).absolute()


def storage_of(root):
    """The writer for a root returned by `resolve`."""
    return root.storage if is_remote(root) else LocalStorage(root)


def is_remote(root) -> bool:
    return not isinstance(root, Path)


def log_dir(root) -> Path:
    """<store>/logs, or for an s3:// store (no appends there) a local one under the replay cache.
    A linked <store>/logs is refused: logs would be appended wherever it leads."""
    if is_remote(root):
        cache = Path(os.environ.get("REPLAY_CACHE", Path.home() / ".cache" / "replay"))
        return cache / "logs" / root.storage.bucket / root.key
    return writable(root, Path(root) / "logs")
