"""Teacher ODE trajectories, the Ray teacher-scoring actor pool, and trajectory shards.

- `teacher_trajectory`: the frozen bidirectional teacher's Euler sampler (LTX-2 schedule, CFG per
  modality) run *through* the student's σ points, recording the state at each of them plus the
  clean end: video [B, K+1, Fv, h, w, C], audio [B, K+1, Fa, C], σ [K+1] (last = 0).
- `guided_x0`: the teacher's CFG x0 at per-frame σ (the DMD real score uses it too).
- `TeacherScorer` + `score_dataset`: `map_batches` over an `ActorPoolStrategy` pool holding the
  teacher (`distill.actor_gpus` each: DiT on GPU in bf16, or CPU fp32 when 0; the ODE state
  is fp32 either way); rows gain `traj_video`, `traj_audio`, `traj_sigmas` (streamed into the
  trainers).
- Trajectory shards: webdataset tars of `<key>.safetensors` + `<key>.json` under
  `<root>/teacher-<sha256 of model.safetensors>/sigmas-<list>/`, written atomically, so a repeated
  or resumed job reuses them. Never pickles. No training and no losses live here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model import AVDiT, flow
from model.sampling import _stack_text


def guided_x0(
    model: AVDiT,
    xv: torch.Tensor,
    xa: torch.Tensor,
    sv: torch.Tensor,
    sa: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    null: tuple[torch.Tensor, torch.Tensor],
    scales: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG x0 (LTX-2 rule c + (s−1)(c−u) on velocity) at per-frame σ sv [B,Fv], sa [B,Fa].

    Only the network runs in its own dtype (bf16 on a GPU teacher actor): the latents x_t are
    cast for it, and its velocities come back in x_t's dtype, so CFG and x0 = x_t − σ·v are
    computed at x_t's precision (fp32 ODE state stays fp32). When x_t is already in the model's
    dtype (fp32 on CPU, the local bf16 real score) nothing is cast: results are as before.
    """
    b, dt = xv.shape[0], next(model.parameters()).dtype
    emb, mask = _stack_text(text, null)  # cond rows first, then uncond
    vv, va = model(
        torch.cat([xv, xv]).to(dt), torch.cat([xa, xa]).to(dt),
        torch.cat([sv, sv]), torch.cat([sa, sa]), emb.to(dt), mask,
    )  # fmt: skip
    vv, va = vv.to(xv.dtype), va.to(xa.dtype)  # [2B, Fv, h, w, C], [2B, Fa, C]
    gv = flow.guided(vv[:b], vv[b:], scales[0])
    ga = flow.guided(va[:b], va[b:], scales[1])
    return flow.x0_from_velocity(xv, gv, sv), flow.x0_from_velocity(xa, ga, sa)


def merged_schedule(student: Sequence[float], steps: int, n_tokens: int) -> list[float]:
    """The teacher's Euler σ list with the student's σ points inserted (descending, ends at 0)."""
    pts = set(flow.ltx2_sigmas(steps, n_tokens).tolist()) | {float(s) for s in student} | {0.0}
    out: list[float] = []
    for s in sorted(pts, reverse=True):
        if not out or out[-1] - s > 1e-6:
            out.append(s)
    return out


def row_seed(key: str, seed: int) -> int:
    """A per-clip seed from its key: a row's trajectory does not depend on how rows are batched."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


@torch.no_grad()
def teacher_trajectory(
    model: AVDiT,
    text_encoder: Any,
    captions: Sequence[str],
    seeds: Sequence[int],
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    student_sigmas: Sequence[float],
    steps: int = 40,
    scales: tuple[float, float] = (3.0, 5.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(traj_v [B,K+1,Fv,h,w,C], traj_a [B,K+1,Fa,C], σ [K+1]) at the student's σ + clean end,
    float32 on the model's device.

    `shapes` = (video [Fv,h,w,C], audio [Fa,C]) of one clip; `seeds` one per caption. The ODE
    state is integrated in fp32 whatever the model's dtype: a bf16 state (8-bit mantissa) would
    round at each of the ~40 Euler steps and the regression targets would carry the sum; only
    the network's inputs are cast to its dtype (`guided_x0`).
    """
    p = next(model.parameters())
    vshape, ashape = shapes
    nv = torch.stack([flow.randn(vshape, torch.Generator().manual_seed(s)) for s in seeds])
    na = torch.stack(
        [flow.randn(ashape, torch.Generator().manual_seed(s + 1)) for s in seeds]
    )  # [B, Fa, C]
    xv, xa = nv.to(p.device, torch.float32), na.to(p.device, torch.float32)
    text = text_encoder(list(captions))
    null = text_encoder([""])
    n_tokens = vshape[0] * model.cfg.video_tokens_per_frame + ashape[0]
    sched = merged_schedule(student_sigmas, steps, n_tokens)
    want = [float(s) for s in student_sigmas] + [0.0]
    rec_v: dict[int, torch.Tensor] = {}
    rec_a: dict[int, torch.Tensor] = {}
    b = len(captions)
    for i, s in enumerate(sched):
        for j, w in enumerate(want):
            if abs(w - s) <= 1e-6 and j not in rec_v:
                rec_v[j], rec_a[j] = xv.clone(), xa.clone()
        if i + 1 == len(sched):
            break
        sv = torch.full((b, vshape[0]), s, device=p.device)
        sa = torch.full((b, ashape[0]), s, device=p.device)
        x0v, x0a = guided_x0(model, xv, xa, sv, sa, text, null, scales)
        nxt = sched[i + 1]  # Euler on velocity == interpolate towards the predicted x0
        xv = xv + (nxt - s) * (xv - x0v) / s
        xa = xa + (nxt - s) * (xa - x0a) / s
    traj_v = torch.stack([rec_v[j] for j in range(len(want))], 1)
    traj_a = torch.stack([rec_a[j] for j in range(len(want))], 1)
    return traj_v, traj_a, torch.tensor(want)


class TeacherScorer:
    """Ray Data actor: holds the frozen teacher; adds its ODE trajectory to each row."""

    def __init__(
        self,
        teacher: str,
        sigmas: Sequence[float],
        steps: int,
        scales: Sequence[float],
        seed: int,
        gpus: float = 0.0,
    ) -> None:
        from pipeline.distill.roles import load_actor_teacher

        self.bundle = load_actor_teacher(teacher, gpus)  # frozen; device/dtype from `gpus`
        self.sigmas, self.steps = list(sigmas), steps
        self.scales, self.seed = (float(scales[0]), float(scales[1])), seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keys = [str(k) for k in batch["key"]]
        video, audio = np.asarray(batch["video"]), np.asarray(batch["audio"])
        traj_v, traj_a, sig = teacher_trajectory(
            self.bundle.model,
            self.bundle.text_encoder,
            [str(c) for c in batch["caption"]],
            [row_seed(k, self.seed) for k in keys],
            (tuple(video.shape[1:]), tuple(audio.shape[1:])),
            self.sigmas,
            self.steps,
            self.scales,
        )
        out = dict(batch)
        out["traj_video"] = traj_v.float().cpu().numpy()
        out["traj_audio"] = traj_a.float().cpu().numpy()
        out["traj_sigmas"] = np.repeat(sig.numpy()[None], len(keys), 0)
        return out


def score_dataset(ds: Any, cfg: Any) -> Any:
    """`ds` rows {key, caption, video, audio} → the same rows plus the teacher's trajectories."""
    from ray.data import ActorPoolStrategy

    d = cfg.distill
    return ds.map_batches(
        TeacherScorer,
        fn_constructor_kwargs={
            "teacher": d.teacher,
            "sigmas": list(d.student_sigmas),
            "steps": d.teacher_steps,
            "scales": [d.ode_cfg_video, d.ode_cfg_audio],
            "seed": cfg.train.seed,
            "gpus": d.actor_gpus,
        },
        compute=ActorPoolStrategy(size=d.actors),
        num_cpus=d.actor_cpus,
        num_gpus=d.actor_gpus,
        batch_size=d.actor_batch_size,
        batch_format="numpy",
    )


# ---- trajectory shards --------------------------------------------------------------------------
def teacher_fingerprint(ref: str | os.PathLike) -> str:
    """sha256 of the teacher's model.safetensors (its manifest's entry); URIs are downloaded."""
    d = Path(ref)
    if not (d / "model.safetensors").is_file():  # download only: no need to load the Bundle
        from pipeline.distill.roles import bundle_uri
        from pipeline.registry import bundle_dir

        d = bundle_dir(bundle_uri(str(ref)), tempfile.mkdtemp(prefix="omni-teacher-"))
    manifest = d / "manifest.json"
    if manifest.is_file():
        digest = json.loads(manifest.read_text()).get("model.safetensors")
        if digest:
            return str(digest)
    from model.bundle import sha256_file

    return sha256_file(d / "model.safetensors")


def trajectory_dir(root: str | os.PathLike, fingerprint: str, sigmas: Sequence[float]) -> Path:
    """`<root>/teacher-<fingerprint[:16]>/sigmas-<σ list>`: one folder per teacher and σ list."""
    tag = "_".join(f"{float(s):.4f}" for s in sigmas)
    return Path(root) / f"teacher-{fingerprint[:16]}" / f"sigmas-{tag}"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_trajectory_shards(
    rows: Iterable[dict[str, Any]], out_dir: str | os.PathLike, per_shard: int = 64
) -> Path:
    """Write rows as shard-NNNNNN.tar + index.json into a temp folder, then rename into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts: list[int] = []
    tar: tarfile.TarFile | None = None
    try:
        for row in rows:
            key = str(row["key"])
            if "." in key or "/" in key:
                raise ValueError(f"trajectory row key {key!r}: keys may not contain '.' or '/'")
            if tar is None or counts[-1] >= per_shard:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(tmp / f"shard-{len(counts):06d}.tar", "w")
                counts.append(0)
            tensors = {
                k: torch.tensor(np.asarray(row[k]))  # a copy: Ray hands read-only arrays
                for k in ("video", "audio", "traj_video", "traj_audio", "traj_sigmas")
            }
            _member(tar, f"{key}.safetensors", st_save(tensors))
            _member(tar, f"{key}.json", json.dumps({"caption": str(row["caption"])}).encode())
            counts[-1] += 1
        if tar is not None:
            tar.close()
        index = {"shards": [f"shard-{i:06d}.tar" for i in range(len(counts))], "counts": counts}
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_trajectory_shards(directory: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Rows back from `write_trajectory_shards`; a bad member is an error naming shard and key."""
    d = Path(directory)
    index = json.loads((d / "index.json").read_text())
    for shard in index["shards"]:
        with tarfile.open(d / shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                f = tar.extractfile(m)
                members.setdefault(key, {})[ext] = f.read() if f else b""
        for key, parts in members.items():
            try:
                tensors = st_load(parts["safetensors"])
                meta = json.loads(parts["json"])
            except Exception as err:  # noqa: BLE001 — SafetensorError is no ValueError
                raise ValueError(f"{d / shard}: sample {key!r} unreadable ({err})") from None
            yield {"key": key, "caption": meta["caption"]} | {
                k: v.numpy() for k, v in tensors.items()
            }


def decode_shard_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `ray.data.read_webdataset` row of a trajectory shard → a trainer row (numpy arrays)."""
    try:
        tensors = st_load(bytes(row["safetensors"]))
        caption = row["json"]["caption"]
    except Exception as err:  # noqa: BLE001 — SafetensorError is no ValueError
        where = f"{row.get('__url__')}: sample {row.get('__key__')!r}"
        raise ValueError(f"{where} unreadable ({err})") from None
    return {"key": row["__key__"], "caption": caption} | {k: v.numpy() for k, v in tensors.items()}


def cached_trajectories(ds: Any, cfg: Any) -> Any:
    """Trajectory rows as a Ray Dataset: from shards when cached, else scored by the actor pool
    (and written as shards first when `distill.trajectory_cache` is set)."""
    import ray.data

    d = cfg.distill
    if not d.trajectory_cache:
        return score_dataset(ds, cfg)
    out = trajectory_dir(d.trajectory_cache, teacher_fingerprint(d.teacher), d.student_sigmas)
    if not (out / "index.json").is_file():
        write_trajectory_shards(score_dataset(ds, cfg).iter_rows(), out)
    index = json.loads((out / "index.json").read_text())
    paths = [str(out / name) for name in index["shards"]]
    return ray.data.read_webdataset(paths).map(decode_shard_row)
