"""Ray Data builders: shards -> decoded samples -> codec latents, streaming, bad samples skipped.

Holds: `ShardDatasource` (Ray's WebDatasetDatasource with a tolerant tar stream, see below),
`RayBadSampleCounter` (the `BadSampleCounter` interface over a small actor, so counts made in
remote tasks reach the driver), `build_dataset(path, ...)` (rows {key, caption, frames, audio,
meta, shard}, the same samples `data.reader.iter_samples` yields), `rows_to_samples`, and
`latent_dataset(path, codecs, ...)` (rows {key, caption, video [Fv,h,w,C], audio [Fa,C]}
float32, the codecs, a fitted-codec folder or a loader, in an ActorPoolStrategy pool), and `local_system_config` (the worker pool a
local Ray needs for these tasks).

Why a datasource subclass and not bare `ray.data.read_webdataset`: Ray's tar loop raises on a
truncated tar and the read task (so the job) fails, and it buffers up to 512 samples before
yielding, so the good samples before the cut would be lost too. The subclass keeps everything
else of read_webdataset (path listing, filesystem handling, file shuffling, per-file tasks) and
replaces only `_read_stream` with `data.shards.iter_tar`, the same code the plain reader uses.

Filesystems: pyarrow ignores AWS_ENDPOINT_URL, so S3 is always given as an explicit s3fs
filesystem built by `data.shards.resolve` (endpoint and keys travel with it to the workers).

Deliberately not here: mp4 decoding (data/mp4.py), the skip policy (data/reader.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np
import ray
from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

from data.mp4 import DecodeSpec
from data.reader import BadSample, BadSampleCounter, Sample, to_sample
from data.shards import RawSample, TarProblem, iter_tar, list_shards, resolve

ROWS_PER_BLOCK = 16  # raw rows (mp4 bytes, ~30 KB each) per emitted block: bounded memory
TASKS_PER_CPU = 4  # the smallest task share here is a read at 0.25 CPU


def local_system_config(num_cpus: int) -> dict[str, Any]:
    """`_system_config` for a local `ray.init` that runs this pipeline.

    Ray keeps at most `num_cpus` idle worker processes and kills the others after a second. The
    pipeline's fractional tasks (read 0.25, decode 0.5 CPU) run up to four per CPU, so each pass
    over the shards started fresh workers that imported PyAV, numpy and torch again: 5 samples/s
    instead of 21-24 on 2 CPUs (64 clips, benchmarks/data.py, session 12). Keep as many idle
    workers as can run at once (~150 MB each).
    """
    return {"num_workers_soft_limit": TASKS_PER_CPU * max(1, int(num_cpus))}


def _raw_row(item: RawSample | TarProblem) -> dict[str, Any]:
    if isinstance(item, TarProblem):
        return {"key": item.key, "shard": item.shard, "suffixes": "", "mp4": b"", "json": b"",
                "problem": item.kind, "message": item.message}  # fmt: skip
    return {
        "key": item.key,
        "shard": item.shard,
        "suffixes": ",".join(sorted(item.members)),
        "mp4": item.members.get("mp4", b""),
        "json": item.members.get("json", b""),
        "problem": "",
        "message": "",
    }


def _from_raw_row(row: dict[str, Any]) -> RawSample | TarProblem:
    if row["problem"]:
        return TarProblem(row["shard"], row["key"], row["problem"], row["message"])
    members = {s: row[s] if s in ("mp4", "json") else b"" for s in row["suffixes"].split(",") if s}
    return RawSample(row["shard"], row["key"], members)


class ShardDatasource(WebDatasetDatasource):
    """read_webdataset's datasource with a tar stream that reports instead of raising."""

    def _read_stream(self, stream: Any, path: str) -> Iterator[Any]:
        import pandas as pd

        rows = []
        for item in iter_tar(stream, path.rsplit("/", 1)[-1]):
            rows.append(_raw_row(item))
            if len(rows) >= ROWS_PER_BLOCK:
                yield pd.DataFrame.from_records(rows)
                rows = []
        if rows:
            yield pd.DataFrame.from_records(rows)


@ray.remote(num_cpus=0)
class _CounterActor:
    def __init__(self) -> None:
        self.counter = BadSampleCounter()

    def add(self, kind: str, shard: str, key: str, message: str) -> None:
        self.counter.add(kind, shard, key, message)

    def events(self) -> list[tuple[str, str, str]]:
        return self.counter.events()

    def counts(self) -> dict[str, int]:
        return self.counter.counts()


class RayBadSampleCounter:
    """`BadSampleCounter` whose state lives in an actor; picklable into Ray tasks."""

    def __init__(self) -> None:
        self.actor = _CounterActor.remote()

    def add(self, kind: str, shard: str, key: str, message: str = "") -> None:
        ray.get(self.actor.add.remote(kind, shard, key, message))  # bad samples are rare

    def add_error(self, err: BadSample) -> None:
        self.add(err.kind, err.shard, err.key, err.message)

    def counts(self) -> dict[str, int]:
        return ray.get(self.actor.counts.remote())

    def events(self) -> list[tuple[str, str, str]]:
        return ray.get(self.actor.events.remote())

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def metrics(self, prefix: str = "data/bad_samples") -> dict[str, float]:
        out = {f"{prefix}/{kind}": float(n) for kind, n in self.counts().items()}
        out[f"{prefix}/total"] = float(self.total)
        return out


def _decode_row(row: dict[str, Any], spec: DecodeSpec, counter: Any) -> list[dict[str, Any]]:
    """flat_map UDF: one raw row -> [] (bad, counted) or [decoded row]."""
    item = _from_raw_row(row)
    if isinstance(item, TarProblem):
        counter.add(item.kind, item.shard, item.key, item.message)
        return []
    try:
        s = to_sample(item, spec)
    except BadSample as err:
        counter.add_error(err)
        return []
    return [{"key": s.key, "caption": s.caption, "frames": s.frames, "audio": s.audio,
             "meta": json.dumps(s.meta, sort_keys=True), "shard": s.shard}]  # fmt: skip


def configure_context(wait_for_min_actors_s: float, ds: Any = None) -> None:
    """Ray Data's context: how long an actor pool may take to start, no progress bars.

    A dataset keeps a copy of the process-wide context taken when it was created (and shares it
    with the datasets derived from it), so a dataset built before this call still holds an
    earlier caller's wait: pass it as `ds` to set its copy too.
    """
    ctxs = [ray.data.DataContext.get_current()] + ([ds.context] if ds is not None else [])
    for ctx in ctxs:
        # The default (-1) waits forever for an actor pool that cannot be scheduled; fail instead.
        ctx.wait_for_min_actors_s = wait_for_min_actors_s
        ctx.enable_progress_bars = False


def build_dataset(
    path: str,
    spec: DecodeSpec | None = None,
    counter: RayBadSampleCounter | None = None,
    decode_cpus: float = 0.5,
    read_cpus: float = 0.25,
    shuffle_files: bool = False,
) -> ray.data.Dataset:
    """Decoded samples as a lazy Ray Dataset: rows {key, caption, frames uint8 [F,H,W,3],
    audio float32 [C,S], meta (JSON string), shard}. Needs `ray.init()` first.

    Bad samples are skipped and counted in `counter` (create one to read the totals).
    """
    spec = spec or DecodeSpec()
    counter = counter if counter is not None else RayBadSampleCounter()
    ray.data.DataContext.get_current().enable_progress_bars = False
    fs, _ = resolve(path)
    shards = list_shards(path)
    source = ShardDatasource(
        shards,
        filesystem=fs if path.startswith("s3://") else None,
        shuffle="files" if shuffle_files else None,
        file_extensions=["tar"],
    )
    raw = ray.data.read_datasource(source, override_num_blocks=len(shards), num_cpus=read_cpus)
    decode = partial(_decode_row, spec=spec, counter=counter)
    return raw.flat_map(decode, num_cpus=decode_cpus)


def rows_to_samples(rows: Iterable[dict[str, Any]]) -> Iterator[Sample]:
    """Ray rows from `build_dataset` -> `Sample` objects (as `iter_samples` yields)."""
    for r in rows:
        yield Sample(r["key"], np.asarray(r["frames"]), np.asarray(r["audio"]), r["caption"],
                     json.loads(r["meta"]), r["shard"])  # fmt: skip


CodecSource = str | Callable[[], tuple[Any, Any]]
"""Where the codec actors get their codecs: a folder of fitted codecs (`model.codecs.save_codecs`)
or a picklable zero-argument loader returning (video codec, audio codec), e.g. a teacher
bundle's learned codecs (`pipeline.distill.data_codecs`): this package stays free of bundles."""


class CodecEncoder:
    """Stateful map_batches UDF: loads the codecs once per actor, encodes a batch of clips."""

    def __init__(self, codecs: CodecSource, gpu: bool = False) -> None:
        """`gpu`: encode on this actor's CUDA device (Ray set CUDA_VISIBLE_DEVICES for its
        num_gpus) in bf16; latents come back float32 either way."""
        import torch

        from model.codecs import load_codecs

        torch.set_num_threads(1)  # fractional-CPU actors must not fan out over every core
        self.video, self.audio = load_codecs(codecs) if isinstance(codecs, str) else codecs()
        if gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "data.codec_gpus > 0 but this codec actor sees no CUDA device "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
                )
            for codec in (self.video, self.audio):
                if hasattr(codec, "to"):  # learned VAEs; our cell codecs are a few matmuls
                    codec.to("cuda", torch.bfloat16)

    def _check(self, latents: Any, frames: Any) -> None:
        """A clip whose frame size is not the codec's (latent grid × its spatial factor) would
        reach the DiT at another grid: refuse it here, saying which size the codec needs."""
        want = tuple(getattr(self.video, "latent_hw", latents.shape[1:3]))
        if tuple(latents.shape[1:3]) != want:
            raise ValueError(
                f"clips of {frames.shape[1]}x{frames.shape[2]} pixels give a {latents.shape[1]}x"
                f"{latents.shape[2]} latent grid, but the codec's is {want[0]}x{want[1]}: write "
                "shards at the codec's frame size (e.g. `omniforcing data synth --height/--width`)"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        video, audio = [], []
        with torch.no_grad():
            for frames, wave in zip(batch["frames"], batch["audio"], strict=True):
                # Arrow hands read-only arrays; torch warns on those, so copy when needed.
                frames = torch.from_numpy(np.require(frames, requirements="CW"))  # uint8 [F,H,W,3]
                wave = torch.from_numpy(np.require(wave, np.float32, "CW"))  # [C,S]
                video.append(self.video.encode(frames).float().numpy())  # [Fv,h,w,C]
                self._check(video[-1], frames)
                audio.append(self.audio.encode(wave).float().numpy())  # [Fa,C]
        return {
            "key": batch["key"],
            "caption": batch["caption"],
            "video": np.stack(video),  # [B,Fv,h,w,C] float32
            "audio": np.stack(audio),  # [B,Fa,C] float32
        }


def latent_dataset(
    path: str,
    codecs: CodecSource,
    batch_size: int = 4,
    actors: int = 1,
    actor_cpus: float = 0.5,
    decode_cpus: float = 0.5,
    actor_gpus: float = 0.0,
    spec: DecodeSpec | None = None,
    counter: RayBadSampleCounter | None = None,
    wait_for_min_actors_s: float = 60.0,
) -> ray.data.Dataset:
    """decode -> codec encode: rows {key, caption, video [Fv,h,w,C], audio [Fa,C]} float32.

    Streaming: blocks flow through decode tasks and a fixed pool of `actors` codec actors with
    `actor_cpus` CPUs each (fractional, so it runs on 2 cores beside other work) and
    `actor_gpus` GPUs each (> 0: the actors encode on CUDA in bf16). `codecs`: a fitted-codec
    folder or a loader (`CodecSource`), called once in each actor.
    """
    if batch_size < 1 or actors < 1 or actor_gpus < 0:
        raise ValueError(
            f"batch_size and actors must be >= 1 and actor_gpus >= 0, got {batch_size}, "
            f"{actors}, {actor_gpus}"
        )
    samples = build_dataset(path, spec=spec, counter=counter, decode_cpus=decode_cpus)
    encoded = samples.map_batches(
        CodecEncoder,
        fn_constructor_args=(codecs, actor_gpus > 0),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        num_gpus=actor_gpus,
    )
    configure_context(wait_for_min_actors_s, encoded)  # its context is the whole plan's
    return encoded
