"""FLOP counts, peak FLOP/s and MFU of the streaming student (benchmarks/streaming.py, on CUDA).

Approximate on purpose: matmul FLOPs only (projections, attention scores and values, FFN,
cross-modal attention), counted from the preset's widths; norms, RoPE and softmax are ignored.
"""

from __future__ import annotations

import torch

from model import AVDiT, flow

K_STEPS = len(flow.DEFAULT_STUDENT_SIGMAS)  # denoise calls per streamed block (+1 commit call)

# Dense peak FLOP/s (bf16 tensor cores, fp32 without) by GPU name; unknown GPUs count as H100 SXM.
PEAK_FLOPS = {
    "H100 PCIe": {torch.bfloat16: 756e12, torch.float32: 51e12},
    "H100": {torch.bfloat16: 989e12, torch.float32: 67e12},
    "H200": {torch.bfloat16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float32: 19.5e12},
}


def forward_flops(
    model: AVDiT, n_video_tokens: int, n_audio_tokens: int, kv_video: int, kv_audio: int
) -> int:
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


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    name = torch.cuda.get_device_name(device)
    gpu = next((k for k in PEAK_FLOPS if k in name), "H100")  # first match: "H100 PCIe" first
    return PEAK_FLOPS[gpu][dtype]


def mfu(model: AVDiT, late_s: float, window: int, peak: float) -> float:
    """Model FLOPs utilisation of a late block (K denoise calls + the commit call)."""
    cfg = model.cfg
    nvt = cfg.video_block_latents * cfg.video_tokens_per_frame
    kv_audio = cfg.audio_block_latents * window
    flops = forward_flops(model, nvt, cfg.audio_block_latents, nvt * window, kv_audio)
    return flops * (K_STEPS + 1) / late_s / peak
