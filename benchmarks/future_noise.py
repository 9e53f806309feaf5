"""How much does a teacher's clean block move with the noise of the blocks after it? (issue 23)

For each cached trajectory row (its noise and the teacher's joint sample of it), the teacher
samples the clip again with the same noise up to block k and a fresh draw after it; printed: the
relative change ‖Δ end‖² / ‖end‖² of every block, averaged over rows. Blocks ≤ k change only
through the later noise, which a causal student never sees, so that change is what its ODE
regression can only average over.

    python -m benchmarks.future_noise --trajectories DIR [--clips 3] [--teacher shipped]
        [--steps 120] [--cfg 3 5]

The sampler is the one the rows were written with (`teacher_trajectory`): the teacher's Δ, its
σ table at `--steps` forwards shifted for the clip's token count, CFG `--cfg` video, audio.
"""

from __future__ import annotations

import argparse

import torch

from model import BlockLayout, flow
from model.guidance import bind
from model.sampling import frame_velocity
from pipeline.distill.roles import load_teacher
from pipeline.distill.trajectory_shards import read_trajectory_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trajectories", required=True, help="a trajectory shard folder")
    ap.add_argument("--teacher", default="shipped", help="the teacher that wrote them")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120, help="the rows' teacher forwards")
    ap.add_argument("--cfg", type=float, nargs=2, default=(3.0, 5.0), help="the rows' CFG")
    args = ap.parse_args()
    torch.set_num_threads(2)
    b = load_teacher(args.teacher)
    rows = list(read_trajectory_shards(args.trajectories))[: args.clips]
    change: dict[tuple[int, int], list[float]] = {}
    with torch.no_grad():
        for i, row in enumerate(rows):
            tv, ta = torch.as_tensor(row["traj_video"]), torch.as_tensor(row["traj_audio"])
            nv, na = tv[0][None].float(), ta[0][None].float()  # σ 1: the row's noise
            lay = BlockLayout.from_counts(nv.shape[1], na.shape[1])
            vid, aid = lay.video_block_ids(), lay.audio_block_ids()
            n_tokens = nv.shape[1] * b.model.cfg.video_tokens_per_frame + na.shape[1]
            table = flow.staggered_table(args.steps, b.stagger, n_tokens)  # Δ 0: ltx2_sigmas
            cap = [str(row["caption"])]
            text, null = b.text_encoder(cap), b.text_encoder([""])
            vel = frame_velocity(b.model, text, null, tuple(args.cfg), bind(b.guide, cap))

            def sample(xv, xa, vel=vel, table=table):
                return flow.euler_sample_staggered(vel, xv, xa, table, b.stagger)

            ref, _ = sample(nv, na)
            g = torch.Generator().manual_seed(777 + i)
            for k in range(1, lay.num_blocks - 1):
                mv, ma = (vid > k)[None, :, None, None, None], (aid > k)[None, :, None]
                fv, fa = flow.randn(nv.shape, g), flow.randn(na.shape, g)
                ev, _ = sample(torch.where(mv, fv, nv), torch.where(ma, fa, na))
                for blk in range(1, lay.num_blocks):
                    sel = vid == blk
                    d = ((ev[0, sel] - ref[0, sel]) ** 2).mean() / (ref[0, sel] ** 2).mean()
                    change.setdefault((k, blk), []).append(float(d))
            print(f"row {i} done", flush=True)
    n_blocks = max(blk for _, blk in change) + 1
    print("noise redrawn after block k: relative change of each block's clean end (mean)")
    print("k   " + " ".join(f"block {j:<3d}" for j in range(1, n_blocks)))
    for k in sorted({k for k, _ in change}):
        vals = [sum(change[k, j]) / len(change[k, j]) for j in range(1, n_blocks)]
        print(f"{k:<3d} " + " ".join(f"{v:9.3f}" for v in vals))


if __name__ == "__main__":
    main()
