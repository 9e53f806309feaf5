"""How far a chunk-by-chunk decode of LTX-2.0's video decoder drifts from a whole-clip decode,
against the context before and the look-ahead after each chunk (docs/operations.md, issue 22).

The decoder is built with LTX-2.0's structure (diffusers' `AutoencoderKLLTX2Video` defaults: its
blocks, layers per block, up-sampling, non-causal in time) but narrow channels and random
weights, so it runs on a laptop: the reach in time is the structure's, the drift's size is not
the trained VAE's (random weights amplify it). Prints the reach (which latents one latent's
change touches) and a relative-L2 table, 4 one-second chunks of 3 latents after the prefix.

    python -m benchmarks.ltx2_decode_drift [--contexts 3,8] [--lookaheads 0,1,2,3,6,9]
"""

from __future__ import annotations

import argparse

import torch

from model.streaming import ChunkDecoder


def structure_vae(seed: int = 0):
    """LTX-2.0's video VAE structure with 16-64 channels (random weights)."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(seed)
    return AutoencoderKLLTX2Video(
        latent_channels=16,
        block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 32, 64),
        decoder_causal=False,  # as LTX-2.0 ships
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    ).eval()


def chunked(codec, z: torch.Tensor, block: int) -> torch.Tensor:
    """The prefix latent, then `block` latents at a time through a ChunkDecoder (what
    StreamingGenerator does), frames concatenated."""
    dec = ChunkDecoder(codec, time_axis=0)
    parts = [dec.push(z[:1], 0)] + [dec.push(z[s : s + block], s) for s in range(1, len(z), block)]
    tail = dec.flush()
    return torch.cat(parts + ([] if tail is None else [tail]))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / (ref - ref.mean()).norm())


@torch.no_grad()
def reach(vae, n: int = 17) -> list[float]:
    """Largest change of each latent's frames when the middle latent moves by 1 (latent units)."""
    z = torch.randn(1, vae.config.latent_channels, n, 2, 2)
    moved = z.clone()
    moved[:, :, n // 2] += 1.0
    d = (vae.decode(moved, return_dict=False)[0] - vae.decode(z, return_dict=False)[0]).abs()
    d = d.amax(dim=(0, 1, 3, 4))  # per frame
    return [float(d[max(0, 1 + 8 * (i - 1)) : 1 + 8 * i].max()) for i in range(n)]


def main() -> None:
    from pipeline.ltx2.codecs import LTX2VideoCodec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="3,8")
    ap.add_argument("--lookaheads", default="0,1,2,3,6,9")
    args = ap.parse_args()
    vae = structure_vae()
    per = reach(vae)
    mid = len(per) // 2
    print("change of each latent's frames, middle latent moved (offset: max |Δ|):")
    print("  " + "  ".join(f"{i - mid:+d}: {v:.2g}" for i, v in enumerate(per)))
    torch.manual_seed(1)
    z = torch.randn(1 + 3 * 4, 2, 2, vae.config.latent_channels)
    looks = [int(x) for x in args.lookaheads.split(",")]
    print("relative L2, chunked vs whole-clip decode")
    print("| context | " + " | ".join(f"look-ahead {n}" for n in looks) + " |")
    for ctx in (int(x) for x in args.contexts.split(",")):
        row = []
        for ahead in looks:
            codec = LTX2VideoCodec(vae, (2, 2), ctx, lookahead_latents=ahead)
            row.append(f"{rel(chunked(codec, z, 3), codec.decode(z)):.3f}")
        print(f"| {ctx} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
