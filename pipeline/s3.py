"""S3 for checkpoints that rides out an endpoint gone for a while: `RetryingS3FileSystem`.

s3fs retries throttling and broken reads, and botocore retries a refused connection four times
within about 15 s; past that an upload fails and Ray Train fails the run (its controller writes
a snapshot to the same storage at every report). This s3fs subclass retries every call that
could not reach the endpoint (connection refused or reset, connect or read timeouts) with
backoff 1, 2, 4, … 30 s for up to OMNIFORCING_S3_RETRY_S seconds (120 by default), logging one
line per wait, then raises an OSError naming the endpoint, the key and how long it tried: never
a hang. Calls that reached S3 and got an answer (NoSuchKey, AccessDenied) are not retried here.
It is pickled with the storage filesystem into Ray's controller and workers, so it lives in an
importable module of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import s3fs
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError
from fsspec.asyn import sync_wrapper

RETRY_ENV = "OMNIFORCING_S3_RETRY_S"
UNREACHABLE = (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)
log = logging.getLogger("omniforcing.s3")


def retry_budget_s() -> float:
    return float(os.environ.get(RETRY_ENV, "120"))


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose calls wait for an unreachable endpoint (see the module docstring). `retry_s`
    (default: $OMNIFORCING_S3_RETRY_S where it is built) travels with the pickled instance."""

    def __init__(self, *args: Any, retry_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_s = retry_budget_s() if retry_s is None else float(retry_s)

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        budget, start, wait, attempt = self.retry_s, time.monotonic(), 1.0, 0
        while True:
            try:
                return await super()._call_s3(method, *args, **kwargs)
            except UNREACHABLE as err:
                spent = time.monotonic() - start
                where = f"{getattr(self, 'endpoint_url', None) or 'S3'} {_key(kwargs)}"
                if spent + wait > budget:
                    raise OSError(
                        f"S3 unreachable: {method} {where} failed for {spent:.0f} s "
                        f"({RETRY_ENV}={budget:g}): {err}"
                    ) from err
                attempt += 1
                name = type(err).__name__
                log.warning("S3 unreachable (%s): %s %s; retry %d in %.0f s", name, method,
                            where, attempt, wait)  # fmt: skip
                await asyncio.sleep(wait)
                wait = min(wait * 2, 30.0)

    # s3fs binds its blocking `call_s3` (what its file objects use on write) to its own
    # `_call_s3`; bind it to the retrying one.
    call_s3 = sync_wrapper(_call_s3)


def _key(kwargs: dict[str, Any]) -> str:
    bucket, key = kwargs.get("Bucket", ""), kwargs.get("Key", kwargs.get("Prefix", ""))
    return f"s3://{bucket}/{key}" if bucket else ""
