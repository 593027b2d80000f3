"""A store on S3 or an S3-compatible server (MinIO, Ceph, R2), through boto3.

Object storage has no rename and no flock, so the guarantees are made the object-storage way:
- a Parquet part or a manifest is one PUT of a complete object: it appears whole or not at all
  (no multipart upload, so a writer killed mid-upload leaves nothing, not even parts to abort);
- `store.json` and the round lease are created with a conditional PUT (`If-None-Match: *`), and a
  stale lease is taken over with `If-Match: <etag>`, so of two racing writers exactly one wins;
- an adapter directory is published by uploading its marker (`adapter_config.json`) last.
Credentials and endpoint come from where boto3 finds them: AWS_* variables, profiles, and
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible servers. DuckDB reads the store through a
read-only file system confined to the store's prefix (`StoreFileSystem`); no httpfs extension.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import json
import os
import socket
import threading
import time
from email.utils import parsedate_to_datetime
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ReplayError

_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION",
        "AWS_REGION")


class S3Error(ReplayError):
    """An S3 request that failed: no credentials, no such bucket, access denied, unreachable endpoint."""


def _boto():
    try:
        import boto3
        import botocore
    except ImportError:
        raise S3Error("an s3:// store needs boto3: pip install 'replay-rlvr[s3]'") from None
    return boto3, botocore


@lru_cache(maxsize=8)
def _client_for(env: tuple):
    boto3, botocore = _boto()
    from botocore.config import Config

    # one client per process (thread-safe); a pool wide enough for DuckDB's reader threads
    return boto3.session.Session().client("s3", config=Config(max_pool_connections=32,
                                                                retries={"mode": "standard", "max_attempts": 5}))


def client():
    return _client_for((os.getpid(), *(os.environ.get(k) for k in _ENV)))  # no client crosses a fork


def _code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _call(what: str, fn, **kwargs):
    """One S3 request; failures become one line naming what was asked (ClientError 404/412 pass)."""
    _, botocore = _boto()
    try:
        return fn(**kwargs)
    except botocore.exceptions.ClientError as exc:
        if _code(exc) in ("404", "NoSuchKey", "PreconditionFailed", "412", "ConditionalRequestConflict",
                          "InvalidRange"):
            raise
        raise S3Error(f"{what}: {_code(exc)}: {exc.response.get('Error', {}).get('Message', exc)}") from None
    except botocore.exceptions.NoCredentialsError:
        raise S3Error(f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise S3Error(f"{what}: {exc}") from None


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
        con.register_filesystem(StoreFileSystem(self))

    def sql_roots(self) -> list[str]:
        return [str(self.root) + "/"]

    def lease(self, name: str, ttl: float = 300.0, holder: str | None = None) -> "S3Lease":
        return S3Lease(self, self.root / name, ttl, holder)


def _fsspec():
    from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

    return AbstractBufferedFile, AbstractFileSystem


def StoreFileSystem(storage: S3Storage):
    """An fsspec file system (protocol s3) that reads only s3://bucket/prefix/… and writes nothing:
    what DuckDB sees of an s3:// store. Built lazily so that fsspec is imported only for S3."""
    return _store_fs_class()(storage)


@lru_cache(maxsize=1)
def _store_fs_class():
    AbstractBufferedFile, AbstractFileSystem = _fsspec()

    class _File(AbstractBufferedFile):
        def _fetch_range(self, start, end):
            return self.fs.fetch(self.key, start, end) if end > start else b""

    class _StoreFS(AbstractFileSystem):
        protocol = ("s3", "s3a")
        cachable = False  # one instance per store and connection: the confinement lives in it

        def __init__(self, storage: S3Storage):
            super().__init__()
            self.storage = storage
            self.scope = f"{storage.bucket}/{storage.prefix}".rstrip("/")
            self.sizes: dict[str, int] = {}  # from listings: DuckDB asks for each globbed file's size
            # one connection's snapshot: DuckDB globs each table and reads its footers once per view
            self.listings: dict[str, dict] = {}
            self.ranges: dict[tuple, bytes] = {}
            self.cached_bytes = 0

        def _list(self, prefix: str) -> dict:
            if prefix not in self.listings:
                self.listings[prefix] = self.storage.list(prefix, detail=True)
            return self.listings[prefix]

        def fetch(self, key: str, start: int, end: int) -> bytes:
            if (key, start, end) in self.ranges:
                return self.ranges[(key, start, end)]
            data = self.storage.get(key, (start, end))
            if end - start <= 2 ** 20 and self.cached_bytes < 64 * 2 ** 20:  # footers, small parts
                self.ranges[(key, start, end)] = data
                self.cached_bytes += len(data)
            return data

        def _key(self, path: str) -> str:
            path = self._strip_protocol(path).rstrip("/")
            if any(part in (".", "..") for part in path.split("/")) or (
                    path != self.scope and not path.startswith(self.scope + "/")):
                raise PermissionError(f"s3://{path}: outside the store s3://{self.scope}/ (SQL reads only its store)")
            return path[len(self.storage.bucket) + 1:]

        def ls(self, path, detail=True, **kwargs):
            key = self._key(path)
            entries, dirs = [], set()
            for k, meta in self._list(key + "/" if key else "").items():
                rest = k[len(key) + 1:] if key else k
                head, _, tail = rest.partition("/")
                if tail:
                    if head not in dirs:
                        dirs.add(head)
                        entries.append({"name": f"{self.storage.bucket}/{key}/{head}".replace("//", "/"),
                                        "size": 0, "type": "directory"})
                else:
                    self.sizes[k] = meta["size"]
                    entries.append({"name": f"{self.storage.bucket}/{k}", "size": meta["size"], "type": "file"})
            return entries if detail else [e["name"] for e in entries]

        def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
            key = self._key(path)
            out = {}
            for k, meta in self._list(key + "/" if key else "").items():
                rel = k[len(key) + 1:] if key else k
                parts = rel.split("/")
                if maxdepth is not None and len(parts) > maxdepth:
                    continue
                if withdirs:
                    for i in range(1, len(parts)):
                        name = f"{self.storage.bucket}/{key}/{'/'.join(parts[:i])}"
                        out.setdefault(name, {"name": name, "size": 0, "type": "directory"})
                name = f"{self.storage.bucket}/{k}"
                self.sizes[k] = meta["size"]
                out[name] = {"name": name, "size": meta["size"], "type": "file"}
            return out if detail else sorted(out)

        def info(self, path, **kwargs):
            key = self._key(path)
            if key in self.sizes:
                return {"name": f"{self.storage.bucket}/{key}", "size": self.sizes[key], "type": "file"}
            head = self.storage.head(key)
            if head is not None:
                return {"name": f"{self.storage.bucket}/{key}", "size": head["ContentLength"], "type": "file",
                        "mtime": head["LastModified"].timestamp()}
            if self.storage.list(key + "/", limit=1):
                return {"name": f"{self.storage.bucket}/{key}", "size": 0, "type": "directory"}
            raise FileNotFoundError(path)

        def modified(self, path):
            return dt.datetime.fromtimestamp(self.info(path).get("mtime", 0), dt.timezone.utc)

        def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
            if mode != "rb":
                raise PermissionError(f"{path}: the store's SQL file system is read-only")
            key = self._key(path)
            f = _File(self, path, mode, block_size=block_size or 4 * 2 ** 20, cache_type="readahead",
                      size=self.info(path)["size"])
            f.key = key
            return f

        def _refuse(self, path, *args, **kwargs):
            raise PermissionError(f"{path}: the store's SQL file system is read-only")

        mkdir = makedirs = rm = rm_file = _rm = mv = cp_file = put_file = touch = pipe_file = _refuse

    return _StoreFS


class LeaseHeld(ReplayError):
    def __init__(self, holder: str):
        super().__init__(f"lease held by {holder}")
        self.holder = holder


class S3Lease:
    """An expiring lease object, taken by conditional PUT: the object-storage stand-in for flock.

    Taking it: PUT If-None-Match:*; if the object exists and has expired (its age on the server's
    clock, Date minus Last-Modified, beyond its ttl), replace it with PUT If-Match:<its etag>, so of
    two ticks that find the same stale lease exactly one takes it. While held, a thread renews it
    every ttl/3 (If-Match on our own etag); a tick killed -9 stops renewing and its lease expires.
    Use as a context manager: `with storage.lease(".round.lock", ttl).acquire(wait=False): …`.
    """

    def __init__(self, storage: S3Storage, path: S3Path, ttl: float = 300.0, holder: str | None = None):
        self.storage, self.path, self.ttl = storage, path, float(ttl)
        self.holder = holder or f"pid {os.getpid()} on {socket.gethostname()}"
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "ttl": self.ttl,
                           "taken_at": dt.datetime.now(dt.timezone.utc).isoformat()}).encode()

    def _put(self, **condition) -> bool:
        _, botocore = _boto()
        try:
            response = _call(f"cannot take lease {self.path}", client().put_object, Bucket=self.storage.bucket,
                             Key=self.path.key, Body=self._body(), **condition)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise
        self.etag = response["ETag"]
        return True

    def current(self) -> tuple[dict, str, float] | None:
        """(record, etag, age in seconds on the server's clock) of the lease object, None if absent."""
        _, botocore = _boto()
        try:
            response = _call(f"cannot read lease {self.path}", client().get_object, Bucket=self.storage.bucket,
                             Key=self.path.key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey"):
                return None
            raise
        try:
            record = json.loads(response["Body"].read())
        except ValueError:
            record = {}
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (now - response["LastModified"]).total_seconds()
        return record, response["ETag"], age

    def try_acquire(self) -> str | None:
        """Take the lease; None on success, else who holds it."""
        if self._put(IfNoneMatch="*"):
            return None
        found = self.current()
        if found is None:  # released between our PUT and GET: try once more
            return None if self._put(IfNoneMatch="*") else "another holder"
        record, etag, age = found
        ttl = float(record.get("ttl", self.ttl)) if isinstance(record, dict) else self.ttl
        holder = str(record.get("holder", "unknown holder")) if isinstance(record, dict) else "unknown holder"
        if age > ttl and self._put(IfMatch=etag):  # stale: take it over, exactly one taker wins
            return None
        return f"{holder}, lease {self.path} renewed {age:.0f}s ago, expires after {ttl:.0f}s"

    def acquire(self, wait: bool = False, poll: float = 2.0) -> "S3Lease":
        while (holder := self.try_acquire()) is not None:
            if not wait:
                raise LeaseHeld(holder)
            time.sleep(poll)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="replay-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._put(IfMatch=self.etag):
                    self.lost.set()  # taken over: we were too slow to renew
                    return
            except ReplayError:
                continue  # a transient failure: the next renewal tries again before expiry

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag and not self.lost.is_set():
            _, botocore = _boto()
            try:
                client().delete_object(Bucket=self.storage.bucket, Key=self.path.key, IfMatch=self.etag)
            except botocore.exceptions.ClientError:
                pass  # someone else holds it now; theirs to delete
        self.etag = None

    def __enter__(self) -> "S3Lease":
        if self._thread is None or not self._thread.is_alive():
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
