"""A store on S3 or an S3-compatible server (MinIO, Ceph, R2), through boto3.

Object storage has no rename and no flock, so the guarantees are made the object-storage way:
- a Parquet part or a manifest is one PUT of a complete object: it appears whole or not at all
  (no multipart upload, so a writer killed mid-upload leaves nothing, not even parts to abort);
- `store.json` and the round lease are created with a conditional PUT (`If-None-Match: *`), and a
  stale lease is taken over with `If-Match: <etag>`, so of two racing writers exactly one wins;
- an adapter directory is published by uploading its marker (`adapter_config.json`) last.
Credentials and endpoint come from where boto3 finds them: AWS_* variables, profiles, and
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible servers. DuckDB reads the store through a
read-only file system confined to the store's prefix (s3_duckdb.py); no httpfs extension. The round
and stage leases: s3_lease.py.
"""

from __future__ import annotations

import fnmatch
import io
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from .s3_client import S3Error, _boto, _call, _code, client  # noqa: F401  (client, S3Error: API)

if TYPE_CHECKING:
    from .s3_lease import S3Lease


class S3Path:
    """A key under a bucket, with the read side of pathlib.Path that the store uses."""

    def __init__(self, storage: "S3Storage", key: str):
        self.storage, self.key = storage, key.strip("/")

    # -- names ---------------------------------------------------------------------------------
    def __truediv__(self, other) -> "S3Path":
        other = "/".join(p for p in str(other).split("/") if p)
        if not other:
            return self
        return S3Path(self.storage, f"{self.key}/{other}" if self.key else other)

    def __str__(self) -> str:
        return f"s3://{self.storage.bucket}/{self.key}" if self.key else f"s3://{self.storage.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, S3Path) and str(self) == str(other)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name[1:] else self.name

    @property
    def parent(self) -> "S3Path":
        return S3Path(self.storage, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"s3://{self.storage.bucket}", *filter(None, self.key.split("/")))

    def with_name(self, name: str) -> "S3Path":
        return self.parent / name

    def absolute(self) -> "S3Path":
        return self

    # -- reads ---------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        return self.storage.get(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def is_file(self) -> bool:
        return self.storage.head(self.key) is not None

    def is_dir(self) -> bool:
        return bool(self.storage.list(self.key + "/", limit=1))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self):
        return self.glob("*")

    def glob(self, pattern: str) -> list["S3Path"]:
        """Files and "directories" (key prefixes) whose path below self matches `pattern`, one
        pathlib-style segment per `/`; a single listing of the literal part of the pattern."""
        segments = pattern.strip("/").split("/")
        literal = []
        for seg in segments:
            if any(c in seg for c in "*?["):
                break
            literal.append(seg)
        base = "/".join(filter(None, [self.key, *literal]))
        found = set()
        for key in self.storage.list(base + "/" if base else ""):
            rel = key[len(self.key) + 1:].split("/") if self.key else key.split("/")
            if len(rel) >= len(segments) and all(fnmatch.fnmatchcase(p, s) for p, s in zip(rel, segments)):
                found.add("/".join(rel[:len(segments)]))
        return sorted(self / rel for rel in found)

    def rglob(self, pattern: str) -> list["S3Path"]:
        return [S3Path(self.storage, k) for k in self.storage.list(self.key + "/")
                if fnmatch.fnmatchcase(k.rsplit("/", 1)[-1], pattern)]

    def open(self, mode: str = "rb"):
        if mode != "rb":
            raise S3Error(f"{self}: objects are written whole through the store, not opened for {mode!r}")
        from .s3_duckdb import StoreFileSystem

        return StoreFileSystem(self.storage).open(str(self), "rb")


class S3Storage:
    """The writes (and the few reads DuckDB does not do) of a store at s3://bucket/prefix."""

    remote = True

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = S3Path(self, self.prefix)

    def _key(self, path: S3Path | str) -> str:
        key = path.key if isinstance(path, S3Path) else str(path)
        if isinstance(path, S3Path) and path.storage.bucket != self.bucket:
            raise S3Error(f"{path}: not in bucket {self.bucket}")
        return key

    # -- primitives ----------------------------------------------------------------------------
    def put(self, path: S3Path, payload: bytes) -> dict:
        """One PUT of the complete object: readers see the old object or the new one, never a part."""
        return _call(f"cannot write {path}", client().put_object, Bucket=self.bucket, Key=self._key(path),
                     Body=payload)

    def put_if_absent(self, path: S3Path, payload: bytes) -> bool:
        """Create the object unless it exists (If-None-Match: *); False when another writer has."""
        _, botocore = _boto()
        try:
            _call(f"cannot create {path}", client().put_object, Bucket=self.bucket, Key=self._key(path),
                  Body=payload, IfNoneMatch="*")
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def write_parquet(self, path: S3Path, table: pa.Table, **options) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", **options)
        self.put(path, buffer.getvalue())

    def get(self, key: str, range_: tuple[int, int] | None = None) -> bytes:
        _, botocore = _boto()
        extra = {"Range": f"bytes={range_[0]}-{range_[1] - 1}"} if range_ else {}
        try:
            response = _call(f"cannot read s3://{self.bucket}/{key}", client().get_object, Bucket=self.bucket,
                             Key=key, **extra)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
            if _code(exc) == "InvalidRange":
                return b""
            raise
        return response["Body"].read()

    def head(self, key: str) -> dict | None:
        _, botocore = _boto()
        try:
            return _call(f"cannot stat s3://{self.bucket}/{key}", client().head_object, Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "403"):
                return None
            raise

    def list(self, prefix: str, limit: int | None = None, detail: bool = False):
        """Keys under `prefix` (all pages); with detail, {key: {"size", "etag"}}."""
        found = {}
        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if limit:
            kwargs["MaxKeys"] = limit
        while True:
            page = _call(f"cannot list s3://{self.bucket}/{prefix}", client().list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                found[item["Key"]] = {"size": item["Size"], "etag": item["ETag"].strip('"')}
            if limit or not page.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        return found if detail else sorted(found)

    def incomplete_uploads(self) -> list[dict]:
        """Multipart uploads under the store's prefix that were never completed nor aborted."""
        prefix = self.prefix + "/" if self.prefix else ""
        found, kwargs = [], {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = _call(f"cannot list uploads of {self.root}", client().list_multipart_uploads, **kwargs)
            found += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return found
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def delete(self, path: S3Path) -> None:
        _call(f"cannot delete {path}", client().delete_object, Bucket=self.bucket, Key=self._key(path))

    # -- directories (adapters) ----------------------------------------------------------------
    def upload_dir(self, local: Path, path: S3Path, marker: str) -> None:
        """Publish a local directory at `path`: the marker first withdrawn, then every other file,
        the marker last, so a reader that sees the marker sees a complete directory."""
        if self.head(self._key(path / marker)) is not None:
            self.delete(path / marker)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for file in [f for f in files if f.name != marker] + [f for f in files if f.name == marker]:
            self.put(path / file.relative_to(local).as_posix(), file.read_bytes())

    def download_dir(self, path: S3Path, local: Path) -> None:
        for key in self.list(path.key + "/"):
            target = local / key[len(path.key) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.get(key))

    # -- DuckDB ----------------------------------------------------------------------------------
    def attach(self, con) -> None:
        """Register the store's read-only, prefix-confined file system with a DuckDB connection."""
        from .s3_duckdb import StoreFileSystem

        con.register_filesystem(StoreFileSystem(self))

    def sql_roots(self) -> list[str]:
        return [str(self.root) + "/"]

    def lease(self, name: str, ttl: float = 300.0, holder: str | None = None) -> "S3Lease":
        from .s3_lease import S3Lease

        return S3Lease(self, self.root / name, ttl, holder)
