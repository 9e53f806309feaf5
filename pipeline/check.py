"""Pre-flight checks of a job config, run before anything expensive starts (`omniforcing check`).

Holds one function per check, each returning `Line(name, ok, detail)` quickly: the config is
valid (errors name the key path), the storage answers a write/read/delete of a probe object
(local folder or s3:// with a custom endpoint), the data shards are listable, the MLflow tracking
store answers (/health over HTTP, an experiment search for sqlite/file stores), and the Ray
cluster (or, with none reachable, this machine) has the CPUs/GPUs the scaling section asks for,
and the memory plan of the distillation stages fits the GPUs (pipeline.memory).
Network checks use short timeouts and no retries, so an unreachable service fails in seconds.
Deliberately NOT here: printing (pipeline/eval_commands.py) and starting any job.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, JobConfig, load_config

TIMEOUT_S = 3.0


@dataclass
class Line:
    """One row of the check table."""

    name: str
    ok: bool
    detail: str
    table: list[str] = field(default_factory=list)  # printed under the check table


def check_config(path: str | None, overrides: list[str]) -> tuple[JobConfig | None, Line]:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        return None, Line("config", False, str(err))
    return cfg, Line("config", True, f"{path or '<defaults>'}: valid (preset {cfg.model.preset})")


def _s3_client(endpoint: str | None, region: str, timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    conf = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 1, "mode": "standard"},  # fail fast: one attempt
    )
    url = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=url, region_name=region, config=conf)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _s3_error(err: Exception, what: str) -> str:
    code = getattr(err, "response", {}).get("Error", {}).get("Code")
    if code:
        return f"{what}: S3 error {code}: {err}"
    return f"{what}: unreachable: {type(err).__name__}: {err}"


def check_storage(cfg: JobConfig, timeout: float = TIMEOUT_S) -> Line:
    """Write, read back and delete a probe object under storage.path."""
    path, payload = cfg.storage.path, uuid.uuid4().hex.encode()
    name = f".omniforcing-probe-{uuid.uuid4().hex[:8]}"
    where = f"storage.path {path!r}"
    if path.startswith("s3://"):
        bucket, prefix = _split_s3(path)
        key = f"{prefix}/{name}" if prefix else name
        try:
            s3 = _s3_client(cfg.storage.endpoint, cfg.storage.region, timeout)
            s3.put_object(Bucket=bucket, Key=key, Body=payload)
            back = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            s3.delete_object(Bucket=bucket, Key=key)
        except Exception as err:  # noqa: BLE001 — botocore raises many kinds; report any
            return Line("storage", False, _s3_error(err, where))
    elif "://" in path:
        return Line("storage", False, f"{where}: only a local folder or s3://bucket/prefix")
    else:
        try:
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (name + ".tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, folder / name)  # atomic, like every real write
            back = (folder / name).read_bytes()
            (folder / name).unlink()
        except OSError as err:
            return Line("storage", False, f"{where}: {err}")
    if back != payload:
        return Line("storage", False, f"{where}: probe object read back differs")
    return Line("storage", True, f"{path}: write/read/delete ok")


def check_data(cfg: JobConfig, timeout: float = TIMEOUT_S) -> Line:
    """The shard folder exists and holds shard-*.tar (random source: nothing to check)."""
    path, where = cfg.data.path, f"data.path {cfg.data.path!r}"
    if cfg.data.source != "shards":
        return Line("data", True, f"source {cfg.data.source}: no shards needed")
    if path.startswith("s3://"):
        bucket, prefix = _split_s3(path)
        endpoint = cfg.data.storage_options.get("endpoint_url") or cfg.storage.endpoint
        try:
            s3 = _s3_client(endpoint, cfg.storage.region, timeout)
            resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/" if prefix else "")
        except Exception as err:  # noqa: BLE001
            return Line("data", False, _s3_error(err, where))
        names = [o["Key"].rsplit("/", 1)[-1] for o in resp.get("Contents", [])]
    else:
        if not Path(path).is_dir():
            return Line("data", False, f"{where}: folder does not exist")
        names = os.listdir(path)
    shards = [n for n in names if n.startswith("shard-") and n.endswith(".tar")]
    if not shards:
        return Line("data", False, f"{where}: no shard-*.tar files")
    return Line("data", True, f"{path}: {len(shards)} shard(s)")


def check_mlflow(cfg: JobConfig, timeout: float = TIMEOUT_S) -> Line:
    """HTTP(S) tracking server: GET /health == OK. Local stores: list one experiment."""
    from pipeline.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            resp = httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
        except httpx.HTTPError as err:
            return Line("mlflow", False, f"tracking server {uri}: unreachable ({err!r})")
        if resp.status_code != 200 or resp.text.strip() != "OK":
            return Line(
                "mlflow", False, f"{uri}/health: HTTP {resp.status_code} {resp.text[:80]!r}"
            )
        return Line("mlflow", True, f"{uri}: healthy")
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 — any store failure is a failed check
        return Line("mlflow", False, f"tracking store {uri}: {type(err).__name__}: {err}")
    return Line("mlflow", True, f"{uri}: store answers")


def cluster_resources(address: str | None) -> tuple[dict[str, float], str]:
    """(resources, source). Ray when initialised or reachable, else a local estimate."""
    import ray

    if not ray.is_initialized() and (address or os.environ.get("RAY_ADDRESS")):
        try:
            ray.init(address=address or "auto", logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as err:
            return {}, f"ray cluster {address or os.environ['RAY_ADDRESS']!r}: {err}"
    if ray.is_initialized():
        res = ray.cluster_resources()
        return {k: float(res.get(k, 0.0)) for k in ("CPU", "GPU", "memory")}, "ray cluster"
    import torch

    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    memory = float(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 0.0
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    gpus = float(torch.cuda.device_count())
    return {"CPU": cpus, "GPU": gpus, "memory": memory}, "local estimate (no Ray cluster)"


def check_resources(cfg: JobConfig, address: str | None = None) -> list[Line]:
    """CPUs and GPUs asked for (num_workers x per-worker, plus the teacher actors and the
    codec actors, which stream beside the trainers) against what the cluster has."""
    res, source = cluster_resources(address)
    if not res:
        return [Line("ray", False, source)]
    sc, d, data = cfg.scaling, cfg.distill, cfg.data
    actor_cpu, actor_gpu = d.actor_resources()  # teacher actors run beside the trainers
    codecs = data.codec_actors if data.source == "shards" else 0
    need_cpu = sc.num_workers * sc.cpus_per_worker + actor_cpu + codecs * data.codec_cpus
    need_gpu = (sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0.0) + actor_gpu
    need_gpu += codecs * data.codec_gpus
    cpu_sum = f"{sc.num_workers} x {sc.cpus_per_worker:g}"
    if actor_cpu:
        cpu_sum += f" + {d.actors} x {d.actor_cpus:g} (distill.actors x actor_cpus)"
    if codecs:
        cpu_sum += f" + {codecs} x {data.codec_cpus:g} (data.codec_actors x codec_cpus)"
    mem_gib = res["memory"] / 2**30
    lines = [
        Line(
            "cpus",
            need_cpu <= res["CPU"],
            f"need {cpu_sum} = {need_cpu:g}, "
            f"have {res['CPU']:g} ({source}; memory {mem_gib:.1f} GiB)",
        ),
        Line(
            "gpus",
            need_gpu <= res["GPU"],
            f"need {need_gpu:g} (scaling.use_gpu={sc.use_gpu}, distill.actor_gpus="
            f"{d.actor_gpus:g}, data.codec_gpus={data.codec_gpus:g}), have {res['GPU']:g} "
            f"({source})",
        ),
    ]
    return lines


def check_memory(cfg: JobConfig) -> list[Line]:
    """The memory plan (pipeline.memory) of each distillation stage against scaling.gpu_memory_gb:
    bytes per trainer rank and per teacher actor by term; a plan over a GPU fails, naming its
    largest term."""
    from pipeline.memory import GB, plan, table

    lines = []
    for stage in ("ode", "self-forcing"):
        p = plan(cfg, stage)
        problems = p.problems()
        worst = max(p.rows, key=lambda r: r.total)
        detail = "; ".join(problems) or (
            f"fits: largest {worst.who} {worst.total / GB:.1f} GB of {p.gpu_bytes / GB:.0f} GB"
        )
        lines.append(Line(f"memory {stage}", not problems, detail, table(p)))
    return lines


def run_checks(
    path: str | None,
    overrides: list[str] | None = None,
    timeout: float = TIMEOUT_S,
    ray_address: str | None = None,
) -> list[Line]:
    """All checks in order; a bad config stops there (nothing else can be checked)."""
    cfg, line = check_config(path, list(overrides or []))
    if cfg is None:
        return [line]
    lines = [line, check_storage(cfg, timeout), check_data(cfg, timeout)]
    lines.append(check_mlflow(cfg, timeout))
    return lines + check_resources(cfg, ray_address) + check_memory(cfg)
