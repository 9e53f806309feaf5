"""Shards on disk and on S3: the tar layout, index.json, atomic writing, tolerant tar iteration.

Holds: `resolve` (path -> fsspec filesystem + root; `s3://` through s3fs with the endpoint and
keys from the usual AWS_* variables), `ShardWriter` (sorted members, fixed mtime, temp name then
rename / local temp then put, index.json last), `read_index` / `list_shards`, `iter_tar` (one
shard -> raw samples, or a `TarProblem` for a truncated tar, a member without a suffix, a
duplicate member) and `synth` (render synthetic clips -> shards).

Deliberately not here: mp4 decoding (data/mp4.py), the skip/count policy and the readers
(data/reader.py, data/ray_data.py), any Ray import.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec

from model.bundle import sha256_file

SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_NAME = "index.json"
FORMAT = "omniforcing-shards/1"
MTIME = 946684800  # 2000-01-01: a fixed member mtime keeps tars byte-identical across runs


def canonical_json(obj: Any) -> bytes:
    """Byte-stable JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_key(key: str) -> str:
    """Keys become tar member stems: no dots (webdataset splits at the first one), no slashes."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    return key


def resolve(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`s3://bucket/prefix` or a local folder -> (filesystem, root without scheme)."""
    if path.startswith("s3://"):
        import s3fs

        env = os.environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        # Explicit keys and endpoint travel with the pickled filesystem to Ray workers, whose
        # environment may predate the test's or job's AWS_* settings.
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            key=env.get("AWS_ACCESS_KEY_ID"),
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            client_kwargs={"region_name": env.get("AWS_DEFAULT_REGION", "us-east-1")},
        )
        return fs, path[len("s3://") :].rstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(path)


def write_tar(path: str, members: dict[str, bytes]) -> None:
    """Write a reproducible tar: members sorted by name, fixed mtime, owner and mode."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))


class ShardWriter:
    """Collect samples into `shard-NNNNNN.tar` files of `shard_size` samples, then index.json.

    Local: each file is written under a temp name in the target folder, then renamed.
    S3: each file is written to a local temp dir, then put (an S3 put is all-or-nothing);
    index.json goes last, so a reader that sees the index sees every shard it lists.
    """

    def __init__(self, out: str, shard_size: int = 64) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.fs, self.root = resolve(out)
        self.remote = out.startswith("s3://")
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._pending: dict[str, bytes] = {}
        self._keys: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="shards-")
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def add(self, key: str, mp4: bytes, meta: dict[str, Any]) -> None:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {len(self.shards)}")
        self._pending[f"{key}.json"] = canonical_json(meta)
        self._pending[f"{key}.mp4"] = mp4
        self._keys.append(key)
        if len(self._keys) >= self.shard_size:
            self._flush()

    def _put(self, local: str, name: str) -> None:
        target = f"{self.root}/{name}"
        if self.remote:
            self.fs.put_file(local, target)
        else:
            os.replace(local, target)

    def _flush(self) -> None:
        if not self._keys:
            return
        name = SHARD_PATTERN.format(len(self.shards))
        folder = self._tmp.name if self.remote else self.root
        fd, local = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        write_tar(local, self._pending)
        os.chmod(local, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        entry = {"name": name, "samples": len(self._keys), "bytes": os.path.getsize(local)}
        entry.update(sha256=sha256_file(local), first_key=min(self._keys), last_key=max(self._keys))
        self._put(local, name)
        self.shards.append(entry)
        self._pending, self._keys = {}, []

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush the last shard, write index.json last; returns the index."""
        self._flush()
        index = {
            "format": FORMAT,
            "shards": self.shards,
            "total_samples": sum(s["samples"] for s in self.shards),
            "total_bytes": sum(s["bytes"] for s in self.shards),
            **(extra or {}),
        }
        fd, local = tempfile.mkstemp(prefix=".index.", suffix=".tmp", dir=self._tmp.name)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(index, sort_keys=True, indent=1).encode())
        if self.remote:
            self._put(local, INDEX_NAME)
        else:  # rename within one filesystem is atomic; copy next to the target first
            final_tmp = f"{self.root}/.{INDEX_NAME}.tmp"
            with open(local, "rb") as src, open(final_tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(final_tmp, f"{self.root}/{INDEX_NAME}")
        self._tmp.cleanup()
        return index


def read_index(path: str) -> dict[str, Any] | None:
    """index.json of a shard folder, or None when there is none."""
    fs, root = resolve(path)
    target = f"{root}/{INDEX_NAME}"
    if not fs.exists(target):
        return None
    with fs.open(target, "rb") as f:
        try:
            return json.loads(f.read())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}/{INDEX_NAME}: invalid JSON ({err})") from err


def list_shards(path: str) -> list[str]:
    """Shard paths (filesystem-relative, no scheme) in order: from index.json, else a listing."""
    fs, root = resolve(path)
    index = read_index(path)
    if index is not None:
        return [f"{root}/{s['name']}" for s in index["shards"]]
    names = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].endswith(".tar"))
    if not names:
        raise FileNotFoundError(f"no shards (*.tar) and no {INDEX_NAME} under {path}")
    return names


@dataclass
class RawSample:
    shard: str  # shard file name, for logs
    key: str
    members: dict[str, bytes]  # suffix ("mp4", "json", ...) -> bytes


@dataclass
class TarProblem:
    shard: str
    key: str  # the sample it hit ("" when none)
    kind: str  # truncated_tar | unreadable_shard | garbage_member
    message: str


class _Watch(io.RawIOBase):
    """Read-through wrapper remembering the total size and the last 1024 bytes."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.total, self.tail = raw, 0, b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-1024:]
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def iter_tar(fileobj: BinaryIO, shard: str) -> Iterator[RawSample | TarProblem]:
    """Stream one tar; group contiguous members by key (the name up to the first dot).

    A truncated tar ends the shard with one `truncated_tar` problem; a sample cut inside a member
    is dropped with it. Python's tarfile treats a cut at a header boundary as a normal end, so the
    end is checked: a complete tar is whole 512-byte blocks ending with two zero blocks.
    """
    watch, key, members = _Watch(fileobj), "", {}
    try:
        with tarfile.open(fileobj=watch, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                data = tar.extractfile(info).read()
                name = info.name.rsplit("/", 1)[-1]
                stem, _, suffix = name.partition(".")
                if not suffix:  # not part of any sample: report it, keep the current sample
                    yield TarProblem(shard, stem, "garbage_member", f"member {name} has no suffix")
                    continue
                if stem != key and key:
                    yield RawSample(shard, key, members)
                    members = {}
                key = stem
                if suffix in members:
                    yield TarProblem(shard, key, "garbage_member", f"member {name} is a duplicate")
                    continue
                members[suffix] = data
        watch.drain()
    except (tarfile.TarError, EOFError, OSError) as err:
        kind = "truncated_tar" if key else "unreadable_shard"  # nothing read: not a tar at all
        yield TarProblem(shard, key, kind, f"{type(err).__name__}: {err}")
        return
    if key:  # all members read are whole here; a cut at a member boundary is reported below
        yield RawSample(shard, key, members)
    if watch.total % 512 or watch.tail != bytes(1024):
        yield TarProblem(shard, key, "truncated_tar", f"no end-of-archive after {watch.total} B")
