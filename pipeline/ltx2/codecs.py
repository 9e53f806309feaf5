"""LTX-2's video VAE as our `VideoCodec` (model/codecs protocol), on diffusers' own classes.

`LTX2VideoCodec` wraps diffusers' `AutoencoderKLLTX2Video`: frames uint8 [F, H, W, 3], F = 1 + 8k,
→ latents [1 + k, h, w, 128] (spatial ÷32, first frame alone), normalised exactly as
`LTX2Pipeline` normalises them (its own `_normalize_latents` / `_denormalize_latents`, with the
VAE's `latents_mean`, `latents_std` and `scaling_factor`), so our latents are the transformer's
input space. Encoding takes the posterior's mode (deterministic, as LTX-2's conditioning does).
The audio side (audio VAE + vocoder) is pipeline/ltx2/audio.py.

Chunk-local decode: LTX-2.0's decoder is not causal in time (`decoder_causal` false) and its
convolutions reach several latents back and ahead, so one second decoded on its own would not
match the whole clip. `decode(latents, start, context)` decodes the chunk behind `context`, the
latents just before it (the streaming generator keeps the last `context_latents` of them), and
drops the frames the context produced. That makes the chunk's start agree with a whole-clip
decode up to the decoder's reach into the past. What the decoder reads from the *next* latents is
the remaining drift, traded against latency by `lookahead_latents` L: the streaming generator
(model.streaming.ChunkDecoder) holds each chunk's last L latents back and decodes them with the
next chunk, passed as `ahead` (decoded, their frames dropped), so video lags by L latents (8L
frames). LTX-2.0's decoder structure reads ~8 latents each way (measured on it with random
weights: docs/operations.md), so no affordable L makes it exact; figures in
tests/test_ltx2_codecs.py and docs/operations.md. Torch + diffusers only; weights never leave
the VAE module (`state()` is its state dict).
"""

from __future__ import annotations

from typing import Any

import torch


def _diffusers_config(module: Any) -> dict[str, Any]:
    """A module's diffusers config as JSON-able data (tuples → lists, private keys dropped)."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dict(module.config).items()
        if not k.startswith("_")
    }


def build_module(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    """A diffusers/transformers module from its config, with `state` assigned as its weights:
    parameters are created empty (accelerate's init_empty_weights, buffers real) and then take
    the tensors of `state` as they are (their dtype), so a large model is never initialised."""
    from accelerate import init_empty_weights

    from model.bundle import load_state_strict

    with init_empty_weights():
        module = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    load_state_strict(module, state, cls.__name__, assign=True)
    return module.eval().requires_grad_(False)


def _context(
    latents: torch.Tensor, start: int, context: torch.Tensor | None, want: int
) -> torch.Tensor:
    """The latents decoded before a chunk: the last `want` of `context` (start > 0), else the
    chunk's own first latent repeated once (the decoder needs one latent of lead-in to give the
    chunk 8 frames per latent); none at start 0."""
    if start == 0:
        return latents[:0]
    if context is not None and want > 0 and len(context) > 0:
        return context[-want:].to(latents)
    return latents[:1]


class LTX2VideoCodec:
    """LTX-2's video VAE behind our `VideoCodec` protocol (see module docstring)."""

    def __init__(
        self,
        vae: Any,
        latent_hw: tuple[int, int],
        context_latents: int = 3,
        decode_timestep: float = 0.0,
        lookahead_latents: int = 0,
    ) -> None:
        c = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = int(c.latent_channels)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.temporal_factor = int(vae.temporal_compression_ratio)
        self.spatial_factor = int(vae.spatial_compression_ratio)
        self.context_latents = int(context_latents)
        self.lookahead_latents = int(lookahead_latents)  # held back while streaming (docstring)
        self.decode_timestep = float(decode_timestep)  # read only with timestep_conditioning

    def config(self) -> dict[str, Any]:
        return {
            "vae": _diffusers_config(self.vae),
            "latent_hw": list(self.latent_hw),
            "context_latents": self.context_latents,
            "decode_timestep": self.decode_timestep,
            "lookahead_latents": self.lookahead_latents,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.vae.state_dict())

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> LTX2VideoCodec:
        from diffusers import AutoencoderKLLTX2Video

        vae = build_module(AutoencoderKLLTX2Video, config["vae"], state)
        return cls(
            vae,
            tuple(config["latent_hw"]),
            config["context_latents"],
            config["decode_timestep"],
            config.get("lookahead_latents", 0),  # bundles imported before it: none
        )

    def to(self, device: Any = None, dtype: Any = None) -> LTX2VideoCodec:
        self.vae.to(device=device, dtype=dtype)
        return self

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [F, H, W, 3], F = 1 + 8k → float32 [1 + k, h, w, C] (LTX-2's normalised space)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
        from diffusers.video_processor import VideoProcessor

        frames = torch.as_tensor(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or (frames.shape[0] - 1) % 8:
            raise ValueError(f"frames must be uint8 [1 + 8k, H, W, 3], got {tuple(frames.shape)}")
        p = self._param()
        x = VideoProcessor.normalize(frames.permute(3, 0, 1, 2)[None].float() / 255.0)
        z = self.vae.encode(x.to(p.device, p.dtype)).latent_dist.mode()  # [1, C, 1 + k, h, w]
        c = self.vae.config
        z = LTX2Pipeline._normalize_latents(
            z.float(), self.vae.latents_mean, self.vae.latents_std, c.scaling_factor
        )
        return z[0].permute(1, 2, 3, 0).cpu().contiguous()

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        start: int = 0,
        context: torch.Tensor | None = None,
        ahead: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float [n, h, w, C] → uint8 [F', H, W, 3]: F' = 1 + 8(n − 1) at start 0, else 8n.
        `context`: the latents just before `start` (most recent last), decoded ahead of the
        chunk and their frames dropped; `ahead`: the latents just after the chunk, decoded
        behind it and their frames dropped (module docstring)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
        from diffusers.video_processor import VideoProcessor

        latents = torch.as_tensor(latents).float()
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(
                f"video latents must be [n, h, w, {self.latent_channels}], got "
                f"{tuple(latents.shape)}"
            )
        ctx = _context(latents, start, context, self.context_latents)
        after = latents[:0] if ahead is None else torch.as_tensor(ahead).to(latents)
        z = torch.cat([ctx, latents, after]).permute(3, 0, 1, 2)[None]  # [1, C, m + n + a, h, w]
        c = self.vae.config
        z = LTX2Pipeline._denormalize_latents(
            z, self.vae.latents_mean.float(), self.vae.latents_std.float(), c.scaling_factor
        )
        p = self._param()
        temb = None
        if c.timestep_conditioning:  # LTX-2.0's decoder has none; later VAEs: no decode noise
            temb = torch.tensor([self.decode_timestep], device=p.device, dtype=p.dtype)
        video = self.vae.decode(z.to(p.device, p.dtype), temb, return_dict=False)[0]
        drop = 0 if start == 0 else 1 + self.temporal_factor * (len(ctx) - 1)
        end = video.shape[2] - self.temporal_factor * len(after)
        video = VideoProcessor(vae_scale_factor=self.spatial_factor).postprocess_video(
            video[:, :, drop:end].float(), output_type="pt"
        )  # [1, F', 3, H, W] in [0, 1]
        return (video[0] * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()
