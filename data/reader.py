"""The sample schema, the bad-sample policy and the plain (single-process) webdataset reader.

Holds: `Sample` (one decoded clip), `BadSampleCounter` (skipped samples counted by kind, each
logged with shard and key), `to_sample` (raw tar members -> Sample or `BadSample`, shared with the
Ray Data reader so both skip exactly the same things) and `iter_samples(path, ...)`: a
`webdataset.DataPipeline` over local or S3 shards (fsspec/s3fs) that never stops on a bad sample.

Deliberately not here: writing shards (data/shards.py), mp4 details (data/mp4.py), Ray.

Bad-sample kinds: truncated_tar, unreadable_shard, garbage_member (not an mp4 / no suffix /
duplicate member), undecodable_mp4, no_audio, fps_mismatch, missing_json, invalid_json,
missing_mp4, dotted_key.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds

from data.mp4 import DecodeError, DecodeSpec, decode_mp4
from data.shards import RawSample, TarProblem, iter_tar, list_shards, resolve

log = logging.getLogger(__name__)

KINDS = (
    "truncated_tar",
    "unreadable_shard",
    "garbage_member",
    "undecodable_mp4",
    "no_audio",
    "fps_mismatch",
    "missing_json",
    "invalid_json",
    "missing_mp4",
    "dotted_key",
)


@dataclass
class Sample:
    key: str
    frames: np.ndarray  # uint8 [F, H, W, 3], F = 1 + 8k
    audio: np.ndarray  # float32 [C, S], S = samples_for_frames(F)
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)  # the sample's JSON
    shard: str = ""


class BadSample(ValueError):
    def __init__(self, kind: str, shard: str, key: str, message: str) -> None:
        super().__init__(f"{kind}: shard {shard} key {key}: {message}")
        self.kind, self.shard, self.key, self.message = kind, shard, key, message


class BadSampleCounter:
    """Skipped samples by kind. Idempotent per (kind, shard, key), so re-reading a dataset (a
    second epoch, a retried task) does not inflate the totals."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def add(self, kind: str, shard: str, key: str, message: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown bad-sample kind {kind!r}; known: {', '.join(KINDS)}")
        with self._lock:
            if (kind, shard, key) in self._seen:
                return
            self._seen.add((kind, shard, key))
        log.warning("skipped bad sample (%s) shard=%s key=%s: %s", kind, shard, key, message)

    def add_error(self, err: BadSample) -> None:
        self.add(err.kind, err.shard, err.key, err.message)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(Counter(kind for kind, _, _ in self._seen).items()))

    def events(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return sorted(self._seen)

    @property
    def total(self) -> int:
        return len(self._seen)

    def metrics(self, prefix: str = "data/bad_samples") -> dict[str, float]:
        """Flat metrics for a job tracker: total plus one entry per kind."""
        out = {f"{prefix}/{kind}": float(n) for kind, n in self.counts().items()}
        out[f"{prefix}/total"] = float(self.total)
        return out


def parse_meta(raw: RawSample) -> dict[str, Any]:
    """The sample's JSON member -> dict with a string caption, or BadSample."""
    if "json" not in raw.members:
        raise BadSample("missing_json", raw.shard, raw.key, "no .json member")
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadSample("invalid_json", raw.shard, raw.key, f"not JSON: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
        raise BadSample("invalid_json", raw.shard, raw.key, "JSON lacks a string 'caption'")
    return meta


def to_sample(raw: RawSample, spec: DecodeSpec) -> Sample:
    """Raw members -> decoded Sample; raises BadSample naming the kind, shard and key."""
    dotted = [s for s in raw.members if "." in s]
    if dotted:  # webdataset keys end at the first dot: "a.b.mp4" arrives as key a, suffix b.mp4
        stem = dotted[0].rsplit(".", 1)[0]
        raise BadSample("dotted_key", raw.shard, f"{raw.key}.{stem}", "sample key has a dot")
    if "mp4" not in raw.members:
        raise BadSample("missing_mp4", raw.shard, raw.key, "no .mp4 member")
    meta = parse_meta(raw)
    try:
        decoded = decode_mp4(raw.members["mp4"], spec)
    except DecodeError as err:
        raise BadSample(err.kind, raw.shard, raw.key, str(err)) from err
    if decoded.issues:
        log.info("shard=%s key=%s length fixed: %s", raw.shard, raw.key, "; ".join(decoded.issues))
    return Sample(raw.key, decoded.frames, decoded.audio, meta["caption"], meta, raw.shard)


def samples_from_raw(
    items: Iterable[RawSample | TarProblem], spec: DecodeSpec, counter: BadSampleCounter
) -> Iterator[Sample]:
    """Decode raw samples, counting and skipping every bad one."""
    for item in items:
        if isinstance(item, TarProblem):
            counter.add(item.kind, item.shard, item.key, item.message)
            continue
        try:
            yield to_sample(item, spec)
        except BadSample as err:
            counter.add_error(err)


def _expand_shards(fs: Any) -> Any:
    """webdataset stage: {url} dicts -> RawSample / TarProblem items, one shard at a time."""

    def stage(src: Iterable[dict[str, str]]) -> Iterator[RawSample | TarProblem]:
        for item in src:
            url = item["url"]
            name = url.rsplit("/", 1)[-1]
            try:
                stream = fs.open(url, "rb")
            except OSError as err:  # listed in index.json but gone: skip the shard, not the job
                yield TarProblem(name, "", "unreadable_shard", f"cannot open {url}: {err}")
                continue
            with stream:
                yield from iter_tar(stream, name)

    return stage


def iter_samples(
    path: str,
    spec: DecodeSpec | None = None,
    counter: BadSampleCounter | None = None,
    shuffle_seed: int | None = None,
    split_by_node: bool = False,
) -> Iterator[Sample]:
    """Decoded samples from the shards at `path` (local folder or s3://bucket/prefix).

    Bad samples are skipped and recorded in `counter` (pass one to read the totals).
    `shuffle_seed` shuffles the shard order reproducibly; `split_by_node` gives each
    torch.distributed rank its own shards.
    """
    spec = spec or DecodeSpec()
    counter = counter if counter is not None else BadSampleCounter()
    fs, _ = resolve(path)
    stages: list[Any] = [wds.SimpleShardList(list_shards(path), seed=shuffle_seed)]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, _expand_shards(fs)]
    stages.append(lambda items: samples_from_raw(items, spec, counter))
    yield from wds.DataPipeline(*stages)
