"""What DuckDB sees of an s3:// store: a read-only fsspec file system confined to the store's prefix.

DuckDB 2.0 has no httpfs wheel, so a connection over an S3 store reads through this file system,
registered per connection (`S3Storage.attach`): it lists and reads objects under
s3://bucket/prefix/ only, and refuses every write.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .s3 import S3Storage


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
