"""Checkpoint storage and the non-engine parts of a checkpoint.

Holds: resolving `storage.path` (local folder or s3://bucket/prefix, custom endpoint) into a
pyarrow filesystem for Ray Train; the checkpoint layout; metadata (step, data position, config
fingerprint) as JSON, per-rank RNG states and EMA weights as safetensors; atomic local assembly
(temp dir, then rename); opening a checkpoint by URI. It does not run DeepSpeed (engines save
their own shards into `engines/<name>/`, see `pipeline.parallelize`) and does not talk to MLflow.

Layout of one checkpoint directory (all ranks' files merged by Ray Train in storage):
    meta.json                      rank 0: step, data position, fingerprint, config, stage
    rng/rank<r>.safetensors        every rank: torch CPU (and CUDA) generator state
    ema/<net>-rank<r>.safetensors  every rank: its EMA shard (full tensors below ZeRO-3)
    engines/<net>/...              DeepSpeed's own checkpoint of that engine
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

META = "meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Storage:
    """Where Ray Train puts checkpoints: `path` for RunConfig and its filesystem (None: local)."""

    path: str
    filesystem: pafs.FileSystem | None
    uri_prefix: str  # "" for local, "s3://" for S3: uri = uri_prefix + path + "/" + rel

    def uri(self, *parts: str) -> str:
        return self.uri_prefix + "/".join([self.path.rstrip("/"), *parts])


def resolve_storage(path: str, endpoint: str | None = None, region: str = "us-east-1") -> Storage:
    """Local folder → absolute path; s3://bucket/prefix → pyarrow S3FileSystem (+endpoint)."""
    if path.startswith("s3://"):
        return Storage(
            path.removeprefix("s3://").rstrip("/"), _s3_filesystem(endpoint, region), "s3://"
        )
    if "://" in path:
        raise ValueError(f"storage.path {path!r}: only a local folder or s3://bucket/prefix")
    local = Path(path).resolve()
    local.mkdir(parents=True, exist_ok=True)
    return Storage(str(local), None, "")


def _s3_filesystem(endpoint: str | None, region: str) -> pafs.FileSystem:
    """pyarrow's native S3 for AWS; s3fs (wrapped for pyarrow) for a custom endpoint.

    pyarrow ignores AWS_ENDPOINT_URL, and its multipart writes fail against moto's server
    (CompleteMultipartUpload → INTERNAL_FAILURE, measured with pyarrow 25 / moto 5.2), while
    s3fs uses plain PutObject for small files and works with any S3-compatible endpoint.
    """
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not endpoint:
        # AWS's standard retries (exponential backoff, connection errors included), longer.
        kw: dict[str, Any] = {
            "region": region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=12),
        }
        if key:
            kw.update(access_key=key, secret_key=secret or "")
        return pafs.S3FileSystem(**kw)
    from pipeline.s3 import RetryingS3FileSystem, retry_budget_s  # waits out an outage

    fs = RetryingS3FileSystem(
        endpoint_url=endpoint,
        key=key,
        secret=secret,
        client_kwargs={"region_name": region},
        retry_s=retry_budget_s(),
    )
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def filesystem_for(
    uri: str, endpoint: str | None = None, region: str = "us-east-1"
) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path on it, URI prefix) of a local path or s3:// URI; creates nothing."""
    if uri.startswith("s3://"):
        return _s3_filesystem(endpoint, region), uri.removeprefix("s3://").rstrip("/"), "s3://"
    return pafs.LocalFileSystem(), str(Path(uri).resolve()), ""


def open_uri(uri: str, endpoint: str | None = None, region: str = "us-east-1") -> Any:
    """A `ray.train.Checkpoint` for a checkpoint URI (local path or s3://)."""
    from ray.train import Checkpoint

    st = resolve_storage(uri, endpoint, region) if uri.startswith("s3://") else None
    if st is None:
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"checkpoint {uri!r} does not exist")
        return Checkpoint(path=str(Path(uri).resolve()))
    return Checkpoint(path=st.path, filesystem=st.filesystem)


def staging_dir(root: Path, step: int) -> tuple[Path, Path]:
    """(temp dir to fill, final dir name): fill temp, then `commit` renames it atomically."""
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp, final


def commit(tmp: Path, final: Path) -> Path:
    os.replace(tmp, final)
    return final


def write_meta(d: Path, meta: dict[str, Any]) -> None:
    """meta.json, written last by rank 0: its presence marks a complete checkpoint."""
    tmp = d / (META + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, **meta}, indent=2, sort_keys=True))
    os.replace(tmp, d / META)


def read_meta(d: Path) -> dict[str, Any]:
    p = Path(d) / META
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {d}: no {META} (incomplete or not a checkpoint)")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {d}: format {meta.get('format')} != {FORMAT_VERSION}")
    return meta


def save_rng(d: Path, rank: int) -> None:
    """Global RNG states of this rank (torch CPU/CUDA, Python); per-step draws use own seeds."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    (d / "rng").mkdir(exist_ok=True)
    py = json.dumps(random.getstate(), default=list)
    save_file(tensors, str(d / "rng" / f"rank{rank}.safetensors"), metadata={"python": py})


def load_rng(d: Path, rank: int) -> None:
    path = d / "rng" / f"rank{rank}.safetensors"
    if not path.is_file():  # a resume with a different world size: keep fresh states
        return
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        state = json.loads(f.metadata()["python"])
    random.setstate((state[0], tuple(state[1]), state[2]))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    return load_file(str(path))
