"""Streaming benchmark: flat per-block cost, cache vs recompute, student vs teacher, (GPU) FPS/MFU.

Every figure that matters is a ratio of two timings measured side by side in this one run:
  - per-block latency at block 50 vs block 5 with a rolling window (target ≤ 1.1);
  - cached vs recompute-the-prefix latency for the block at 20 s;
  - student (streaming, K steps + commit) vs teacher (40-step Euler, CFG) time to a finished 5 s
    clip, next to the FLOP ratio 40·P/(K+1) (P = 2 passes per teacher step with CFG);
  - on CUDA (ltx2 preset, random bf16 weights): FPS after the first chunk, time to first chunk,
    peak memory, MFU;
  - with --graphs: the same block, clip and first-chunk figures through `GraphedStream` (CUDA
    graphs on a GPU, its static buffers eagerly on a CPU) beside the eager ones, with the largest
    difference of their latents on one seed.
`run(...)` returns the figures (used by `omniforcing bench`); `main()` prints them.
Usage: python benchmarks/streaming.py --preset tiny demo [--device cuda --preset ltx2] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: import from the repo root, not from this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.flops import K_STEPS, mfu, peak_flops
from model import AVDiT, BlockLayout, flow, preset
from model.graphs import GraphedStream
from model.sampling import guided_velocity
from model.streaming import rollout_blocks

TEACHER_STEPS = 40
CFG_PASSES = 2  # cond + uncond per teacher step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(name: str, device: torch.device, dtype: torch.dtype, causal: bool = True) -> AVDiT:
    # Built on the target device in the target dtype: an ltx2 model built on the CPU in fp32
    # first would need 75 GB of host memory and minutes of CPU initialisation.
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AVDiT(preset(name, causal=causal))
    finally:
        torch.set_default_dtype(default)
    return model.to(device=device, dtype=dtype).eval()


def _text(model: AVDiT, device, dtype):
    g = torch.Generator().manual_seed(0)  # the same prompt in every stream of the run
    emb = torch.randn(1, 8, model.cfg.text_dim, generator=g)
    return emb.to(device=device, dtype=dtype), None


def _stream(model, seconds, windows, device, dtype, graphed: GraphedStream | None = None, seed=0):
    """rollout_blocks over one clip, eager or through `graphed` (same text, same seed)."""
    emb, mask = _text(model, device, dtype)
    if graphed is None:
        view, cache = model, model.new_cache(emb, mask, seconds, windows)
    else:
        view, cache = graphed, graphed.reset(emb, mask)
    gen = torch.Generator().manual_seed(seed)
    return rollout_blocks(view, cache, seconds, flow.DEFAULT_STUDENT_SIGMAS, gen)


@torch.no_grad()
def block_times(model, seconds, windows, device, dtype, graphed=None) -> list[float]:
    """Wall time of every block of a streamed clip (denoise K steps + commit), in seconds."""
    times, t = [], time.perf_counter()
    for _ in _stream(model, seconds, windows, device, dtype, graphed):
        _sync(device)
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


@torch.no_grad()
def recompute_block_time(model, block, device, dtype, repeats=3) -> float:
    """Latency of block `block` without a cache: K full block-causal forwards over blocks 0..block."""
    cfg = model.cfg
    lay = BlockLayout(block)
    h, w = cfg.video_latent_hw
    v = torch.randn(1, lay.num_video, h, w, cfg.video.latent_channels, device=device, dtype=dtype)
    a = torch.randn(1, lay.num_audio, cfg.audio.latent_channels, device=device, dtype=dtype)
    emb, mask = _text(model, device, dtype)
    sv = torch.zeros(1, lay.num_video, device=device)
    sa = torch.zeros(1, lay.num_audio, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for s in flow.DEFAULT_STUDENT_SIGMAS:
            sv[:, lay.video_range(block)[0] :] = s
            sa[:, lay.audio_range(block)[0] :] = s
            model(v, a, sv, sa, emb, mask)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def teacher_clip_time(name, seconds, device, dtype, steps=TEACHER_STEPS) -> float:
    """Seconds to a finished clip by the bidirectional teacher (one untimed warm-up step first)."""
    teacher = _model(name, device, dtype, causal=False)
    emb, mask = _text(teacher, device, dtype)
    null = (torch.zeros_like(emb), None)
    vel = guided_velocity(teacher, (emb, mask), null, (3.0, 5.0))
    lay = BlockLayout(seconds)
    cfg = teacher.cfg
    h, w = cfg.video_latent_hw
    nv = torch.randn(1, lay.num_video, h, w, cfg.video.latent_channels, device=device, dtype=dtype)
    na = torch.randn(1, lay.num_audio, cfg.audio.latent_channels, device=device, dtype=dtype)
    flow.euler_sample(vel, nv, na, flow.ltx2_sigmas(1))  # warm-up: cuBLAS/cuDNN plans
    _sync(device)
    t = time.perf_counter()
    flow.euler_sample(vel, nv, na, flow.ltx2_sigmas(steps))
    _sync(device)
    return time.perf_counter() - t


def _flat_cost(model: AVDiT, blocks: int, window: int, device, dtype, graphed=None) -> dict:
    """Per-block latency at block 5 vs block `blocks - 2` of one clip with a rolling window."""
    if blocks < 12:  # block 5's median window (blocks 3..7) must not overlap the late one
        raise ValueError(f"--blocks must be ≥ 12, got {blocks}")
    times = block_times(model, blocks, (window, window), device, dtype, graphed)
    early, late = statistics.median(times[3:8]), statistics.median(times[-5:])
    return {
        "early_block": 5,
        "late_block": blocks - 2,
        "early_s": early,
        "late_s": late,
        "ratio_late_vs_early": late / early,
    }


def _cache_vs_recompute(model: AVDiT, block: int, device, dtype) -> dict:
    """The block at `block` s from the KV cache vs recomputing every earlier block."""
    cached = statistics.median(block_times(model, block, (None, None), device, dtype)[-3:])
    recompute = recompute_block_time(model, block, device, dtype)
    return {
        "cache_block": block,
        "cached_s": cached,
        "recompute_s": recompute,
        "recompute_over_cached": recompute / cached,
    }


def _student_clip(model: AVDiT, window: int, device, dtype, graphed=None) -> dict:
    """A finished 5 s clip streamed block by block; peak memory is this stream's alone. (A 5 s
    clip is the same with a window of ≥ 5 blocks as with none: the first eviction comes later.)"""
    cfg = model.cfg
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clip = block_times(model, 5, (window, window), device, dtype, graphed)
    out = {
        "student_5s_s": sum(clip),
        "time_to_first_chunk_s": clip[0] + clip[1],  # prefix + first second
        "fps_after_first_chunk": cfg.fps * 4 / sum(clip[2:]),
        "realtime_factor": 5.0 / sum(clip),
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


@torch.no_grad()
def profile_block(model: AVDiT, window: int, device, dtype, rows: int = 20) -> str:
    """Operator table (by self time on the device) of one late block, to see where time goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    emb, mask = _text(model, device, dtype)
    cache = model.new_cache(emb, mask, 12, (window, window))
    blocks = rollout_blocks(model, cache, 12, flow.DEFAULT_STUDENT_SIGMAS, torch.Generator())
    for _ in range(window + 3):  # past the prefix, the window full
        next(blocks)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        next(blocks)
        _sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


@torch.no_grad()
def _graphs_section(model: AVDiT, blocks: int, window: int, device, dtype) -> dict:
    """The block, clip and first-chunk figures through `GraphedStream`, and how far its latents
    are from the eager path's on one seed (bf16 on a GPU: rounding, not zero)."""
    graphed = GraphedStream(model, (window, window), text_len=8)
    t = time.perf_counter()
    warm = [
        (v.clone(), a.clone())
        for _, v, a in _stream(model, window + 2, None, device, dtype, graphed)
    ]
    out: dict = {"capture_s": time.perf_counter() - t, "graphs": graphed.graph_count}
    eager = list(_stream(model, window + 2, (window, window), device, dtype))
    out["max_abs_diff_vs_eager"] = max(
        max((x - y).abs().max().item() for x, y in zip(w, e[1:], strict=True))
        for w, e in zip(warm, eager, strict=True)
    )
    out["block_latency_s"] = flat = _flat_cost(model, blocks, window, device, dtype, graphed)
    out.update(_student_clip(model, window, device, dtype, graphed))
    if device.type == "cuda":
        out["mfu"] = mfu(model, flat["late_s"], window, peak_flops(device, dtype))
    out["replays"] = graphed.replays
    return out


def _figures(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "profile"}  # the operator table prints apart


def _note(out: dict) -> None:
    # Figures so far on stderr: a later section that fails (an OOM in the teacher) loses nothing.
    print(json.dumps(_figures(out)), file=sys.stderr, flush=True)


def run_preset(
    name: str,
    device: torch.device,
    dtype,
    long_blocks: int,
    window: int,
    cache_block: int = 20,
    profile: bool = False,
    graphs: bool = False,
) -> dict:
    model = _model(name, device, dtype)
    cfg = model.cfg
    out: dict = {"preset": name, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    out["params"] = model.param_counts()["total"]
    # Warm-up stream past the window fill: cuBLAS/cuDNN plans for every shape before timing.
    t = time.perf_counter()
    block_times(model, window + 3, (window, window), device, dtype)
    out["warmup_s"] = time.perf_counter() - t
    out["block_latency_s"] = flat = _flat_cost(model, long_blocks, window, device, dtype)
    _note(out)
    out.update(_cache_vs_recompute(model, cache_block, device, dtype))
    _note(out)
    tokens_per_block = cfg.video_block_latents * cfg.video_tokens_per_frame
    tokens_per_block += cfg.audio_block_latents
    out["tokens_per_s"] = tokens_per_block * (K_STEPS + 1) / flat["late_s"]
    out.update(_student_clip(model, window, device, dtype))
    if device.type == "cuda":
        out["peak_flops"] = peak_flops(device, dtype)
        out["mfu"] = mfu(model, flat["late_s"], window, out["peak_flops"])
    if profile:
        out["profile"] = profile_block(model, window, device, dtype)
    _note(out)
    if graphs:
        try:
            out["graphed"] = g = _graphs_section(model, long_blocks, window, device, dtype)
        except Exception as err:  # first runs on a new GPU stack: keep the figures around it
            out["graphs_error"] = f"{type(err).__name__}: {err}"
        else:
            g["fps_graphed_over_eager"] = g["fps_after_first_chunk"] / out["fps_after_first_chunk"]
            g["ttfc_eager_over_graphed"] = out["time_to_first_chunk_s"] / g["time_to_first_chunk_s"]
        _note(out)
    del model  # an ltx2 student and teacher do not fit on one GPU together
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["teacher_5s_s"] = teacher_clip_time(name, 5, device, dtype)
    out["speedup_teacher_over_student"] = out["teacher_5s_s"] / out["student_5s_s"]
    out["flop_ratio_40P_over_K1"] = TEACHER_STEPS * CFG_PASSES / (K_STEPS + 1)
    out["speedup_share_of_flop_ratio"] = (
        out["speedup_teacher_over_student"] / out["flop_ratio_40P_over_K1"]
    )
    if "graphed" in out:
        g = out["graphed"]
        g["speedup_teacher_over_student"] = out["teacher_5s_s"] / g["student_5s_s"]
        g["speedup_share_of_flop_ratio"] = (
            g["speedup_teacher_over_student"] / out["flop_ratio_40P_over_K1"]
        )
    return out


def run(
    presets: list[str],
    device: str = "cpu",
    blocks: int = 52,
    window: int = 5,
    cache_block: int = 20,
    profile: bool = False,
    graphs: bool = False,
) -> dict:
    """All figures for each preset, measured in this one process (bf16 on CUDA, else fp32)."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    runs = [
        run_preset(n, dev, dtype, blocks, window, cache_block, profile, graphs) for n in presets
    ]
    return {"blocks": blocks, "window": window, "runs": runs}


def main() -> None:
    from benchmarks.report import machine, write_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["tiny", "demo"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=52, help="clip length for the flat-cost test")
    ap.add_argument("--window", type=int, default=5, help="rolling window (blocks) per modality")
    ap.add_argument("--cache-block", type=int, default=20, help="block for cache vs recompute")
    ap.add_argument("--profile", action="store_true", help="operator table of one late block")
    ap.add_argument("--graphs", action="store_true", help="also stream through GraphedStream")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"machine": machine()}
    figures = run(
        args.preset,
        args.device,
        args.blocks,
        args.window,
        args.cache_block,
        args.profile,
        args.graphs,
    )
    results.update(figures)
    for r in results["runs"]:
        print(r.get("profile", ""))
        print(json.dumps(_figures(r), indent=2))
    if args.json:
        write_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
