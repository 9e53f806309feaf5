"""Trajectory shards: the teacher's ODE rows cached as webdataset tars of `<key>.safetensors` +
`<key>.json` under `<root>/teacher-<fingerprint>/data-<tag>/sigmas-<list>-steps<N>-cfg<v>_<a>/`,
written atomically, so a repeated or resumed job reuses them, and a change of teacher weights,
guide, dataset (its path and index), seed (it picks each row's noise), student σ, teacher steps
or CFG scales writes new ones. Never pickles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.distill.trajectories import score_dataset


def teacher_fingerprint(ref: str | os.PathLike) -> str:
    """sha256 of the teacher's model.safetensors (its manifest's entry); URIs are downloaded.
    A teacher that ships an autoguidance guide samples differently: its fingerprint also covers
    the guide's weight files and weight w, and one on a staggered schedule its Δ."""
    from model.bundle import GUIDE_FILES, sha256_file

    d = Path(ref)
    if not (d / "model.safetensors").is_file():  # download only: no need to load the Bundle
        from pipeline.distill.roles import bundle_uri
        from pipeline.registry import bundle_dir

        d = bundle_dir(bundle_uri(str(ref)), tempfile.mkdtemp(prefix="omni-teacher-"))
    manifest = d / "manifest.json"
    digests = json.loads(manifest.read_text()) if manifest.is_file() else {}

    def digest(name: str) -> str:
        return str(digests.get(name) or sha256_file(d / name))

    config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    parts = [digest("model.safetensors")]
    if "guide" in config:
        parts += [*map(digest, GUIDE_FILES), str(config["guide"]["weight"])]
    if config.get("sampler", {}).get("stagger"):
        parts.append(f"stagger={config['sampler']['stagger']}")
    if len(parts) == 1:
        return parts[0]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def sampler_tag(distill: Any) -> str:
    """The teacher sampler settings the ODE rows depend on: `steps<N>-cfg<video>_<audio>`."""
    return f"steps{distill.teacher_steps}-cfg{distill.ode_cfg_video:g}_{distill.ode_cfg_audio:g}"


def data_tag(cfg: Any) -> str:
    """`data-<16 hex>`: the rows' source as the trajectories depend on it: data source, path,
    clip length, how many clips (`data.clips`, `random_clips`), the codecs that encode them,
    the shard index (a re-synthesised folder at the same path differs) and the seed (`row_seed`
    draws each row's noise from it). Without it a second dataset pointed at
    the same cache would be handed the first one's trajectories, captions and all."""
    from data.shards import read_index

    d = cfg.data
    parts: list[Any] = [d.source, str(d.path), d.seconds, cfg.train.seed, d.clips]
    parts += [d.random_clips] if d.source == "random" else [d.codecs, str(d.codec_dir)]
    if d.source == "shards":
        parts.append(read_index(str(d.path)))
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return "data-" + hashlib.sha256(blob).hexdigest()[:16]


def trajectory_dir(
    root: str | os.PathLike,
    fingerprint: str,
    sigmas: Sequence[float],
    sampler: str = "",
    data: str = "",
) -> Path:
    """`<root>/teacher-<fingerprint[:16]>[/<data>]/sigmas-<σ list>[-<sampler>]`: one folder per
    teacher, dataset and seed (`data_tag`), σ list and teacher sampler (`sampler_tag`)."""
    tag = "_".join(f"{float(s):.4f}" for s in sigmas)
    base = Path(root) / f"teacher-{fingerprint[:16]}"
    if data:
        base = base / data
    return base / f"sigmas-{tag}{'-' + sampler if sampler else ''}"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_trajectory_shards(
    rows: Iterable[dict[str, Any]], out_dir: str | os.PathLike, per_shard: int = 64
) -> Path:
    """Write rows as shard-NNNNNN.tar + index.json into a temp folder, then rename into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts: list[int] = []
    tar: tarfile.TarFile | None = None
    try:
        for row in rows:
            key = str(row["key"])
            if "." in key or "/" in key:
                raise ValueError(f"trajectory row key {key!r}: keys may not contain '.' or '/'")
            if tar is None or counts[-1] >= per_shard:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(tmp / f"shard-{len(counts):06d}.tar", "w")
                counts.append(0)
            tensors = {
                k: torch.tensor(np.asarray(row[k]))  # a copy: Ray hands read-only arrays
                for k in ("video", "audio", "traj_video", "traj_audio", "traj_sigmas")
            }
            _member(tar, f"{key}.safetensors", st_save(tensors))
            _member(tar, f"{key}.json", json.dumps({"caption": str(row["caption"])}).encode())
            counts[-1] += 1
        if tar is not None:
            tar.close()
        index = {"shards": [f"shard-{i:06d}.tar" for i in range(len(counts))], "counts": counts}
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_trajectory_shards(directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows back from `write_trajectory_shards`; a bad member is an error naming shard and key."""
    d = Path(directory)
    index = json.loads((d / "index.json").read_text())
    for shard in index["shards"]:
        with tarfile.open(d / shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                f = tar.extractfile(m)
                members.setdefault(key, {})[ext] = f.read() if f else b""
        for key, parts in members.items():
            try:
                tensors = st_load(parts["safetensors"])
                meta = json.loads(parts["json"])
            except Exception as err:  # noqa: BLE001 — SafetensorError is no ValueError
                raise ValueError(f"{d / shard}: sample {key!r} unreadable ({err})") from None
            yield {"key": key, "caption": meta["caption"]} | {
                k: v.numpy() for k, v in tensors.items()
            }


def decode_shard_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `ray.data.read_webdataset` row of a trajectory shard → a trainer row (numpy arrays)."""
    try:
        tensors = st_load(bytes(row["safetensors"]))
        caption = row["json"]["caption"]
    except Exception as err:  # noqa: BLE001 — SafetensorError is no ValueError
        where = f"{row.get('__url__')}: sample {row.get('__key__')!r}"
        raise ValueError(f"{where} unreadable ({err})") from None
    return {"key": row["__key__"], "caption": caption} | {k: v.numpy() for k, v in tensors.items()}


def cached_trajectories(ds: Any, cfg: Any) -> Any:
    """Trajectory rows as a Ray Dataset: from shards when cached, else scored by the actor pool
    (and written as shards first when `distill.trajectory_cache` is set)."""
    import ray.data

    d = cfg.distill
    if not d.trajectory_cache:
        return score_dataset(ds, cfg)
    fp = teacher_fingerprint(d.teacher)
    out = trajectory_dir(d.trajectory_cache, fp, d.student_sigmas, sampler_tag(d), data_tag(cfg))
    if not (out / "index.json").is_file():
        write_trajectory_shards(score_dataset(ds, cfg).iter_rows(), out)
    index = json.loads((out / "index.json").read_text())
    paths = [str(out / name) for name in index["shards"]]
    return ray.data.read_webdataset(paths).map(decode_shard_row)
