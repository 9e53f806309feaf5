"""Streaming benchmark: flat per-block cost, cache vs recompute, student vs teacher, (GPU) FPS/MFU.

Every figure that matters is a ratio of two timings measured side by side in this one run:
  - per-block latency at block 50 vs block 5 with a rolling window (target ≤ 1.1);
  - cached vs recompute-the-prefix latency for the block at 20 s;
  - student (streaming, K steps + commit) vs teacher (40-step Euler, CFG) time to a finished 5 s
    clip, next to the FLOP ratio 40·P/(K+1) (P = 2 passes per teacher step with CFG);
  - on CUDA (ltx2 preset, random bf16 weights): FPS after the first chunk, time to first chunk,
    peak memory, MFU.
Usage: python benchmarks/streaming.py --preset tiny demo [--device cuda --preset ltx2] [--json out]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from model import AVDiT, BlockLayout, flow, preset
from model.sampling import guided_velocity
from model.streaming import rollout_blocks

K_STEPS = len(flow.DEFAULT_STUDENT_SIGMAS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(name: str, device, dtype, causal=True) -> AVDiT:
    torch.manual_seed(0)
    return AVDiT(preset(name, causal=causal)).to(device=device, dtype=dtype).eval()


def _text(model: AVDiT, device, dtype):
    return torch.randn(1, 8, model.cfg.text_dim, device=device, dtype=dtype), None


@torch.no_grad()
def block_times(model, seconds, windows, device, dtype) -> list[float]:
    """Wall time of every block of a streamed clip (denoise K steps + commit), in seconds."""
    emb, mask = _text(model, device, dtype)
    cache = model.new_cache(emb, mask, seconds, windows)
    gen = torch.Generator().manual_seed(0)
    times, t = [], time.perf_counter()
    for _ in rollout_blocks(model, cache, seconds, flow.DEFAULT_STUDENT_SIGMAS, gen):
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
def teacher_clip_time(name, seconds, device, dtype, steps=40) -> float:
    teacher = _model(name, device, dtype, causal=False)
    emb, mask = _text(teacher, device, dtype)
    null = (torch.zeros_like(emb), None)
    vel = guided_velocity(teacher, (emb, mask), null, (3.0, 5.0))
    lay = BlockLayout(seconds)
    cfg = teacher.cfg
    h, w = cfg.video_latent_hw
    nv = torch.randn(1, lay.num_video, h, w, cfg.video.latent_channels, device=device, dtype=dtype)
    na = torch.randn(1, lay.num_audio, cfg.audio.latent_channels, device=device, dtype=dtype)
    _sync(device)
    t = time.perf_counter()
    flow.euler_sample(vel, nv, na, flow.ltx2_sigmas(steps))
    _sync(device)
    return time.perf_counter() - t


def forward_flops(
    model: AVDiT, n_video_tokens: int, n_audio_tokens: int, kv_video: int, kv_audio: int
):
    """Approximate FLOPs of one forward on n tokens attending to kv tokens (matmuls only)."""
    cfg = model.cfg
    dv, da, f = cfg.video.width, cfg.audio.width, cfg.ffn_mult
    per_layer = (
        2 * n_video_tokens * (4 * dv * dv + 2 * dv * dv + 2 * f * dv * dv + 2 * dv * da)
        + 2 * n_audio_tokens * (4 * da * da + 2 * da * da + 2 * f * da * da + 2 * da * dv)
        + 4 * n_video_tokens * kv_video * dv
        + 4 * n_audio_tokens * kv_audio * da
        + 4 * n_video_tokens * kv_audio * da
        + 4 * n_audio_tokens * kv_video * da
    )
    return per_layer * cfg.layers


def run_preset(name: str, device: torch.device, dtype, long_blocks: int, window: int) -> dict:
    model = _model(name, device, dtype)
    cfg = model.cfg
    out: dict = {"preset": name, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    times = block_times(model, long_blocks, (window, window), device, dtype)
    early = statistics.median(times[3:8])
    late = statistics.median(times[-5:])
    out["block_latency_s"] = {"block5": early, "block50": late, "ratio_50_vs_5": late / early}
    cached20 = statistics.median(block_times(model, 20, (None, None), device, dtype)[18:21])
    recompute20 = recompute_block_time(model, 20, device, dtype)
    out["block20_cached_s"], out["block20_recompute_s"] = cached20, recompute20
    out["recompute_over_cached"] = recompute20 / cached20
    tokens_per_block = (
        cfg.video_block_latents * cfg.video_tokens_per_frame + cfg.audio_block_latents
    )
    out["tokens_per_s"] = tokens_per_block * (K_STEPS + 1) / late
    clip = block_times(model, 5, (None, None), device, dtype)
    student5 = sum(clip)
    teacher5 = teacher_clip_time(name, 5, device, dtype)
    out["student_5s_s"], out["teacher_5s_s"] = student5, teacher5
    out["speedup_teacher_over_student"] = teacher5 / student5
    out["flop_ratio_40P_over_K1"] = 40 * 2 / (K_STEPS + 1)
    out["speedup_share_of_flop_ratio"] = (
        out["speedup_teacher_over_student"] / out["flop_ratio_40P_over_K1"]
    )
    out["time_to_first_chunk_s"] = clip[0] + clip[1]  # prefix + first second
    out["fps_after_first_chunk"] = cfg.fps * 4 / sum(clip[2:])
    out["realtime_factor"] = 5.0 / student5
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        nvt = cfg.video_block_latents * cfg.video_tokens_per_frame
        flops = forward_flops(model, nvt, cfg.audio_block_latents, nvt * window, 25 * window)
        peak = 989e12 if dtype == torch.bfloat16 else 67e12  # H100 SXM dense
        out["mfu"] = flops * (K_STEPS + 1) / late / peak
    return out


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["tiny", "demo"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=52, help="clip length for the flat-cost test")
    ap.add_argument("--window", type=int, default=5, help="rolling window (blocks) per modality")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {"machine": machine(), "runs": []}
    for name in args.preset:
        r = run_preset(name, device, dtype, args.blocks, args.window)
        results["runs"].append(r)
        print(json.dumps(r, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
