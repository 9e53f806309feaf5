"""Serving benchmark: HTTP streaming through Ray Serve vs in-process generation, and aggregate FPS
under concurrency. All figures come from one run on one machine, so the ratios are comparable.

    python benchmarks/serve.py [--model DIR|models:/…|tiny] [--seconds 3] [--streams 1,2,4]

Prints time to first chunk (TTFC) and mean per-chunk interval in-process and over HTTP with their
ratio (the serving overhead), then aggregate generated FPS at each concurrency. `--json PATH`
also writes the figures. It measures; it asserts nothing (tests/test_serve.py does). `run(...)`
returns the figures (used by `omniforcing bench`); `main()` prints them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def _best(runs: list[list[float]]) -> dict[str, float]:
    # Chunk arrival times of the fastest run: load from other processes only ever adds time.
    times = min(runs, key=lambda t: t[-1])
    return {"ttfc_s": times[0], "chunk_s": statistics.mean(_gaps(times)), "total_s": times[-1]}


def _in_process(model: str, seconds: int, seed: int, repeats: int) -> dict[str, float]:
    import torch

    from deploy.models import load_model

    # A Serve replica with <= 1 CPU runs with OMP_NUM_THREADS=1 (set by Ray): match it.
    torch.set_num_threads(1)
    loaded = load_model(model)
    for _ in loaded.new_generator().stream("warm up", 1, 0):
        pass
    runs = []
    for _ in range(repeats):
        t0, times = time.perf_counter(), []
        for _ in loaded.new_generator().stream("a red ball moving right", seconds, seed):
            times.append(time.perf_counter() - t0)
        runs.append(times)
    return _best(runs)


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)] or [times[0]]


def _http(url: str, seconds: int, seed: int, repeats: int) -> dict[str, float]:
    from deploy.client import save_stream, stream_http

    save_stream(stream_http(url, "warm up", 1, 0), None)
    prompt = "a red ball moving right"
    runs = [save_stream(stream_http(url, prompt, seconds, seed), None) for _ in range(repeats)]
    return _best([r.chunk_times_s for r in runs])


def _concurrent(url: str, n: int, seconds: int) -> dict[str, float]:
    from deploy.client import save_stream, stream_http

    results: list = [None] * n

    def run(i: int) -> None:
        results[i] = save_stream(stream_http(url, f"ball {i}", seconds, i), None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    frames = sum(r.frames for r in results)
    return {
        "streams": n,
        "wall_s": wall,
        "aggregate_fps": frames / wall,
        "mean_ttfc_s": statistics.mean(r.ttfc_s for r in results),
        "rtf_per_stream": statistics.mean(r.rtf for r in results),
    }


def run(
    model: str = "tiny",
    seconds: int = 3,
    streams: tuple[int, ...] = (1, 2, 4),
    port: int = 18765,
    repeats: int = 3,
) -> dict:
    """TTFC and per-chunk time in-process vs over HTTP, then aggregate FPS per concurrency."""
    path = model
    if model == "tiny":
        from model.testing import tiny_bundle

        path = str(Path(tempfile.mkdtemp()) / "tiny-student")
        tiny_bundle(seed=0).save_pretrained(path)
    import torch

    threads = torch.get_num_threads()
    try:
        local = _in_process(path, seconds, seed=1, repeats=repeats)
    finally:
        torch.set_num_threads(threads)  # _in_process pins one thread, like a Serve replica
    import ray
    from ray import serve

    from deploy.cli import start_serve

    # No address: start_serve starts its own local Ray, never joins one already running here.
    start_serve(
        path, port=port, max_streams=max(streams), max_seconds=seconds, replica_cpus=0.5, num_cpus=8
    )
    url = f"http://127.0.0.1:{port}"
    try:
        remote = _http(url, seconds, seed=1, repeats=repeats)
        conc = [_concurrent(url, n, seconds) for n in streams]
    finally:
        serve.shutdown()
        ray.shutdown()  # the local Ray start_serve started for this run
    return {
        "model": model,
        "seconds": seconds,
        "in_process": local,
        "http": remote,
        "overhead_ttfc": remote["ttfc_s"] / local["ttfc_s"],
        "overhead_chunk": remote["chunk_s"] / local["chunk_s"],
        "concurrency": conc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="bundle dir, models:/…, or tiny (random)")
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--repeats", type=int, default=3, help="runs per path; the fastest counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = tuple(int(x) for x in args.streams.split(","))
    out = run(args.model, args.seconds, levels, args.port, args.repeats)
    print(f"{'':14}{'TTFC ms':>10}{'chunk ms':>10}{'total s':>9}")
    for name, r in (("in-process", out["in_process"]), ("HTTP (Serve)", out["http"])):
        print(f"{name:14}{r['ttfc_s'] * 1e3:10.1f}{r['chunk_s'] * 1e3:10.1f}{r['total_s']:9.2f}")
    print(
        f"overhead ratio: TTFC x{out['overhead_ttfc']:.2f}, per chunk x{out['overhead_chunk']:.2f}"
    )
    for c in out["concurrency"]:
        print(
            f"{c['streams']} streams: aggregate {c['aggregate_fps']:.1f} FPS, "
            f"mean TTFC {c['mean_ttfc_s'] * 1e3:.0f} ms, real-time factor/stream {c['rtf_per_stream']:.2f}"
        )
    if args.json:
        from benchmarks.report import write_atomic

        write_atomic(Path(args.json), json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
