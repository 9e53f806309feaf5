"""A throwaway local S3 endpoint: `moto_server` in a subprocess on a free port.

Shared by the test fixtures (tests/fixtures/s3.py) and the data benchmark (benchmarks/data.py),
which both need a real endpoint that s3fs talks to unpatched. It lives in an installed package
because `omniforcing bench` runs from the installed console script, where `tests` is not
importable. `moto_server` comes with the `test` extra (`pip install 'omniforcing[test]'`); this
module only starts the executable and never imports moto.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once `url` answers HTTP; raise if `proc` exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before serving {url}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout} s")


def _executable() -> str:
    # Next to this interpreter first: a venv's bin/ is often not on PATH (e.g. under pytest).
    beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
    found = beside if os.path.exists(beside) else shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server not found; install it with pip install 'omniforcing[test]'")
    return found


def _stop(proc: subprocess.Popen) -> None:
    # wait() reaps the child: terminate() alone leaves a zombie and, if it ignores SIGTERM, a
    # live server holding the port.
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[str]:
    """A running `moto_server` on 127.0.0.1; yields its URL and stops it (reaped) on exit."""
    port = free_port()
    cmd = [_executable(), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc, timeout)
        yield url
    finally:
        _stop(proc)


def env_for(url: str, key: str = "testing") -> dict[str, str]:
    """The AWS_* variables (ENV_KEYS) that point boto3 and s3fs at the endpoint `url`."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def local_s3(bucket: str, key: str = "testing") -> Iterator[str]:
    """A fresh endpoint holding an empty `bucket`, with os.environ's AWS_* pointing at it.

    Yields the endpoint URL. On exit, however the body ends, the AWS_* variables are restored to
    what they were (later code in this process must not talk to the stopped endpoint) and the
    server is stopped and reaped.
    """
    import boto3

    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    with moto_server() as url:
        try:
            os.environ.update(env_for(url, key))
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
