"""The object-storage stand-in for flock: an expiring lease object taken by conditional PUT."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from email.utils import parsedate_to_datetime

from typing import TYPE_CHECKING

from ..errors import ReplayError
from .s3_client import _boto, _call, _code, client

if TYPE_CHECKING:
    from .s3 import S3Path, S3Storage


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
