"""The files of a `pipeline.single` run: sharded weights with the run's record, a Bundle of them,
and the MLflow run made of them afterwards.

`save_weights` writes EMA weights as <prefix>.<k>.safetensors files of at most 15 MiB (what comes
back from a lent machine is capped at 16 MiB per file), the record (config, metric history, steps,
wall time, device) in every file's metadata plus a per-save token, so `load_weights` rejects a set
mixed from two saves. `export` makes a model Bundle with a Bundle's codecs; `log_run` records a
finished teacher run in MLflow.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import validate

SHIPPED = str(Path(__file__).resolve().parent / "assets" / "demo-teacher")  # codecs' default
SHARD_BYTES = 15 * 2**20  # files that come back from a lent machine are capped at 16 MiB


def save_weights(
    state: dict[str, torch.Tensor], record: dict[str, Any], prefix: Path
) -> list[Path]:
    """`state` as <prefix>.<k>.safetensors files of ≤ 15 MiB, each with the record, atomically
    (the record is in every file's header, so it counts against each file's budget)."""
    from safetensors.torch import save_file

    text = json.dumps(record)
    budget = SHARD_BYTES - len(text.encode())
    if budget <= 0:
        raise ValueError(f"{prefix}: the run's record alone is {len(text)} bytes (> 15 MiB)")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > budget:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    # Files are replaced one by one: `save` (a per-call token) lets a reader reject a mixed set.
    meta = {"record": text, "shards": str(len(shards)), "save": str(time.time_ns())}
    paths = []
    for k, part in enumerate(shards):
        path = prefix.with_name(f"{prefix.name}.{k}.safetensors")
        save_file(part, str(path) + ".tmp", metadata=meta)
        os.replace(str(path) + ".tmp", path)
        paths.append(path)
    return paths


def load_weights(prefix: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full state, record) from the files `_save` wrote at `prefix`."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    first = prefix.with_name(f"{prefix.name}.0.safetensors")
    if not first.is_file():
        raise FileNotFoundError(
            f"{prefix}: no {first.name} (not a `pipeline.single` train or distill output)"
        )
    with safe_open(str(first), "pt") as f:
        meta = f.metadata()
    for k in range(int(meta["shards"])):
        path = prefix.with_name(f"{prefix.name}.{k}.safetensors")
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("save") != meta.get("save"):
                raise ValueError(f"{path}: from another save than {first.name} (interrupted?)")
            state |= {n: f.get_tensor(n) for n in f.keys()}
    return state, json.loads(meta["record"])


def export(prefix: Path, codecs: str, out: Path) -> Path:
    """A `train` output + the codecs of the Bundle at `codecs` → a model Bundle at `out`."""
    from model.bundle import Bundle
    from pipeline.stages.teacher import write_bundle

    state, record = load_weights(prefix)
    cfg = validate(record["config"], source=f"{prefix} record")
    src = Bundle.from_pretrained(codecs)
    extra = {"stage": "teacher", "step": record["steps"], "source": str(prefix)}
    extra["trained_on"] = record["device"]
    if record.get("init"):  # a fine-tune's steps continue its init bundle's
        from model.bundle import read_config

        start = read_config(Path(record["init"]), verify=False).get("extra", {}).get("step", 0)
        extra |= {"step": start + record["steps"], "init": record["init"], "init_step": start}
    mcfg = cfg.build_model_config(causal=False)
    return write_bundle(cfg, mcfg, state, out, extra, (src.video_codec, src.audio_codec))


def log_run(prefix: Path, codecs: str = SHIPPED, tracking_uri: str | None = None) -> str:
    """Record a `train` output as a finished MLflow teacher run, as `omniforcing train teacher`
    would have: config params, the metric history, loss curves and the exported `bundle` artifact
    (so `distill.teacher: <run id>` and `runs:/<id>/bundle` work). Returns the run id."""
    import tempfile

    from pipeline import tracking
    from pipeline.plots import loss_curve

    _, record = load_weights(prefix)
    cfg = validate(record["config"], source=f"{prefix} record")
    uri = tracking_uri or tracking.tracking_uri(cfg)
    client = tracking.client_for(uri)
    run_id = tracking.start_stage_run(client, cfg, "teacher", f"single-{prefix.parent.name}")
    logger = tracking.MetricLogger(uri, run_id)
    for row in record["metrics"]:
        logger.log(int(row["step"]), {k: v for k, v in row.items() if k != "step"})
    with tempfile.TemporaryDirectory() as d:
        export(prefix, codecs, Path(d) / "bundle")
        client.log_artifacts(run_id, str(Path(d) / "bundle"), "bundle")
        curves = logger.history(["loss/video", "loss/audio"])
        loss_curve(curves, Path(d) / "loss.png", "teacher loss (pipeline.single)")
        client.log_artifact(run_id, str(Path(d) / "loss.png"), "plots")
    info = {k: str(record[k]) for k in ("trained_by", "device", "steps", "wall_s", "init")}
    tracking.set_tags(
        client,
        run_id,
        {tracking.SINGLE_TAG_PREFIX + k: v for k, v in info.items()}
        | {tracking.EXPORT_TAG: "bundle", tracking.STATUS_TAG: "finished"},
    )
    client.set_terminated(run_id, "FINISHED")
    return run_id
