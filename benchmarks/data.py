"""Data-loading throughput: Ray Data pipeline vs a single-process webdataset loop, same S3 shards.

Starts a local S3 endpoint (`data.local_s3`: moto_server on a free port), writes synthetic
shards to it with `data.synth.synth`, fits the embedded codecs, then measures samples/s for
  plain  : `data.reader.iter_samples` in this process (decode; decode + codec encode)
  ray    : `data.ray_data.build_dataset` / `latent_dataset` on a local Ray with 1 and 2 CPUs
and prints the figures with ray/plain ratios. Each Ray figure is the best of `--repeats` runs
(the first run pays for worker start-up; that time is printed separately). `run(...)` returns the
figures (used by `omniforcing bench`); `main()` prints them.

Usage: python benchmarks/data.py [--clips 16] [--seconds 5.04] [--repeats 2]
Deliberately not a test: it asserts nothing and is not run by the suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _rate(run: Callable[[], Iterable], expect: int) -> tuple[float, float]:
    """(samples/s, seconds) of one full pass."""
    start = time.perf_counter()
    n = sum(1 for _ in run())
    took = time.perf_counter() - start
    if n != expect:
        raise RuntimeError(f"expected {expect} samples, got {n}")
    return n / took, took


def _plain(path: str, codec_dir: str, clips: int) -> dict[str, float]:
    import numpy as np
    import torch

    from data.reader import iter_samples
    from model.codecs import load_codecs

    video, audio = load_codecs(codec_dir)

    def encode() -> Iterable:
        with torch.no_grad():
            for s in iter_samples(path):
                v = video.encode(torch.from_numpy(np.ascontiguousarray(s.frames)))
                yield v, audio.encode(torch.from_numpy(s.audio))

    return {
        "decode": _rate(lambda: iter_samples(path), clips)[0],
        "decode+encode": _rate(encode, clips)[0],
    }


def _ray(path: str, codec_dir: str, clips: int, cpus: int, repeats: int) -> dict[str, float]:
    import ray

    from data.ray_data import build_dataset, latent_dataset, local_system_config

    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=local_system_config(cpus),  # as pipeline.trainer.ensure_ray starts it
    )
    try:
        runs = {
            "decode": lambda: build_dataset(path).iter_rows(),
            "decode+encode": lambda: latent_dataset(path, codec_dir, batch_size=4).iter_rows(),
        }
        out = {}
        for name, run in runs.items():
            rates = [_rate(run, clips) for _ in range(repeats)]
            out[name] = max(r for r, _ in rates)
            out[f"{name} first-run s"] = rates[0][1]
        return out
    finally:
        ray.shutdown()


def run(clips: int = 16, seconds: float = 5.04, shard_size: int = 4, repeats: int = 2) -> dict:
    """samples/s of each pipeline on the same shards, and each one's ratio to the plain loop."""
    import torch

    from data.local_s3 import local_s3
    from data.reader import iter_samples
    from data.synth import synth
    from model.codecs import fit_codecs, save_codecs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the plain loop gets one core, like one Ray CPU
    try:
        # local_s3 restores AWS_* and reaps moto_server however this ends: later suites in the
        # same process must not talk to a stopped endpoint.
        with local_s3("bench", key="bench"):
            path = "s3://bench/shards"
            synth(path, clips, seconds=seconds, shard_size=shard_size, seed=0)
            codec_dir = tempfile.mkdtemp(prefix="bench-codec-")
            save_codecs(codec_dir, *fit_codecs((s.frames, s.audio) for s in iter_samples(path)))
            rows = {"plain 1 process": _plain(path, codec_dir, clips)}
            for cpus in (1, 2):
                rows[f"ray {cpus} CPU"] = _ray(path, codec_dir, clips, cpus, repeats)
    finally:
        torch.set_num_threads(threads)
    plain = rows["plain 1 process"]
    for r in rows.values():
        for kind in ("decode", "decode+encode"):
            r[f"{kind} ratio"] = r[kind] / plain[kind]
    return {"clips": clips, "seconds": seconds, "shard_size": shard_size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.04)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out = run(args.clips, args.seconds, args.shard_size, args.repeats)
    print(f"{args.clips} clips of {args.seconds} s, shards of {args.shard_size}")
    print(f"{'':18}{'decode/s':>10}{'ratio':>8}{'dec+enc/s':>11}{'ratio':>8}{'1st run s':>11}")
    for name, r in out["rows"].items():
        first = r.get("decode first-run s")
        print(
            f"{name:18}{r['decode']:10.2f}{r['decode ratio']:8.2f}"
            f"{r['decode+encode']:11.2f}{r['decode+encode ratio']:8.2f}"
            f"{(f'{first:.1f}' if first else '-'):>11}"
        )


if __name__ == "__main__":
    main()
