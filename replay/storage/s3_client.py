"""The boto3 client of this process and the one way an S3 request fails: one line naming what was asked."""

from __future__ import annotations

import os
from functools import lru_cache

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
