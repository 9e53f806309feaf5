"""Job configuration: one YAML per job, validated into strict pydantic models.

Holds the typed sections (model, data, train, scaling, storage, mlflow, distill), loading with
`--set a.b=c` overrides and error messages that name the offending key path; which keys matter
for resume is pipeline/fingerprint.py. It does not build models, engines or datasets (see
`pipeline.trainer` / `pipeline.parallelize`) and never touches Ray or MLflow.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A user error in a config file or an override; the message names the key path."""


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


class _Strict(BaseModel):
    # extra="forbid": an unknown or mistyped key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    preset: Literal["tiny", "demo", "ltx2"] = "tiny"  # named model.config preset
    causal: bool | None = None  # None: the stage decides (teacher False, student True)
    num_sinks: int | None = Field(default=None, ge=0)  # audio sink tokens (student only)
    overrides: dict[str, Any] = {}  # any ModelConfig field, nested for video/audio

    @model_validator(mode="after")
    def _check_overrides(self) -> ModelSection:
        # Build the ModelConfig once so a bad override fails at load time with its path.
        try:
            from model import ModelConfig, preset
        except ImportError:  # model package not importable (partial checkout): check later
            return self
        try:
            ModelConfig.from_dict(_deep_merge(preset(self.preset).to_dict(), self.overrides))
        except (ValueError, TypeError) as err:
            raise ValueError(f"model.overrides: {err}") from None
        return self


class DataSection(_Strict):
    source: Literal["shards", "random"] = "shards"  # random: in-memory latents (tests, benches)
    path: str = "data/shards"  # shard folder, local or s3://bucket/prefix
    codec_dir: str | None = None  # fitted codecs (model.codecs.save_codecs); None: <path>/codecs
    # What the distillation stages encode clips with: `auto` = the teacher bundle's codecs when
    # they are learned (LTX-2's VAEs), else codec_dir; `teacher`; `codec_dir` (the teacher stage
    # always uses codec_dir). pipeline/distill/data_codecs.py.
    codecs: Literal["auto", "teacher", "codec_dir"] = "auto"
    storage_options: dict[str, str] = {}  # e.g. {"endpoint_url": "http://127.0.0.1:5555"}
    batch_size: int = Field(default=2, ge=1)  # per worker, per micro-step
    clips: int | None = Field(default=None, ge=1)  # use at most this many clips (None: all)
    seconds: int = Field(default=1, ge=1)  # random source: clip length in one-second blocks
    random_clips: int = Field(default=64, ge=1)  # random source: dataset size
    # Decode + encode the shards once and keep the latents in Ray's object store, so epochs
    # after the first cost no mp4 decoding (small data sets: the demo's 2k clips are ~70 MB).
    cache_latents: bool = False
    # The codec actor pool that encodes shards (Ray Data map_batches): actors, logical CPUs and
    # GPUs each. codec_gpus > 0 encodes on the actor's CUDA device in bf16 (LTX-2's VAEs on a
    # cluster; Ray hands each actor its share of a card); 0 encodes on the CPU in fp32.
    codec_actors: int = Field(default=1, ge=1)
    codec_cpus: float = Field(default=0.5, gt=0.0)
    codec_gpus: float = Field(default=0.0, ge=0.0)
    # How long the codec actors may take to start before the job fails (never hangs): a busy
    # 2-core box has needed minutes to start one beside other work.
    actor_start_timeout_s: float = Field(default=300.0, gt=0)


class OptimizerSection(_Strict):
    name: Literal["adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=0.0, ge=0.0)
    eps: float = Field(default=1e-8, gt=0.0)


class EmaSection(_Strict):
    enabled: bool = True
    decay: float = Field(default=0.999, ge=0.0, le=1.0)
    # Keep the fp32 EMA in host memory (updated from the device's pieces each step): 4 bytes per
    # partition element off the GPU, one device-to-host copy of this rank's weights per step.
    offload: bool = False


class LogitNormal(_Strict):
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0.0)


class SigmaSection(_Strict):
    """Teacher training σ ~ logit-normal(mean, std) (SD3's timestep sampling), per sample, drawn
    independently per modality. A positive video mean trains the high-noise end harder, where a
    clip's global motion is decided (issue 8: the demo teacher's open-space turns are made at
    σ > 0.7), while the audio keeps its low-noise precision (contact timing). `tied` is the share
    of samples whose audio σ is set to their video σ: the condition the joint sampler runs in
    (both streams at one σ), which independent draws rarely hit at the high-noise end.
    `stagger` is the share of samples drawn instead on a staggered schedule (`flow.
    staggered_sigmas`: τ ~ U(0, 1), Δ ~ U(0, `stagger_max`), earlier frames cleaner), the
    condition of the staggered teacher sampler, each frame denoised seeing a cleaner past."""

    video: LogitNormal = LogitNormal()
    audio: LogitNormal = LogitNormal()
    tied: float = Field(default=0.0, ge=0.0, le=1.0)
    stagger: float = Field(default=0.0, ge=0.0, le=1.0)
    stagger_max: float = Field(default=3.0, ge=0.0)


class FidelitySection(_Strict):
    """Fidelity while training (pipeline/fidelity.py): every `every` steps the stage's exported
    student (its EMA weights when EMA is on) streams `clips` world prompts, clip i with seed
    `seed + i`, and their sync share within 40 ms, median offset, reversals and caption-direction
    adherence are logged as `fidelity/…` beside the losses; the teacher's figures on the same
    prompts and seeds are computed once per run as the reference. The best step by `best_by` is
    exported as the run's `best/step-N` Bundle, which `omniforcing promote` registers."""

    every: int = Field(default=0, ge=0)  # optimizer steps between evaluations; 0: off, no cost
    clips: int = Field(default=4, ge=1)  # fixed prompt/seed set size
    seed: int = 10_000  # clip i: world prompt render_clip(seed + i), generation seed seed + i
    seconds: int | None = Field(default=None, ge=1)  # seconds per clip; None: data.seconds
    # The figure that picks the best step: sync share within 40 ms and caption-direction
    # adherence (higher is better) or the median contact-to-onset offset (lower is better).
    best_by: Literal["sync_40ms", "median_offset_ms", "direction_acc"] = "sync_40ms"
    teacher: bool = True  # also score the teacher once per run (the reference line)
    # Also evaluate the starting weights (step 0) on a fresh start, so the best step can be
    # where the stage began: a stage that only makes its student worse promotes its start.
    at_start: bool = True


class TrainSection(_Strict):
    steps: int = Field(default=100, ge=1)  # optimizer steps (not micro-steps)
    lr: float = Field(default=3e-4, gt=0.0)
    optimizer: OptimizerSection = OptimizerSection()
    warmup_steps: int = Field(default=10, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)  # cosine floor as a fraction of lr
    grad_accum: int = Field(default=1, ge=1)
    clip_grad: float = Field(default=1.0, ge=0.0)  # 0 disables clipping
    ema: EmaSection = EmaSection()
    text_dropout: float = Field(default=0.1, ge=0.0, le=1.0)  # caption → "" for CFG
    sigma: SigmaSection = SigmaSection()  # teacher stage: training noise levels
    seed: int = 0
    zero_stage: Literal[1, 2, 3] = 2
    # Recompute each layer's activations in backward (torch.utils.checkpoint per AVLayer):
    # only layer inputs are kept, at one more forward per layer (pipeline.parallelize).
    gradient_checkpointing: bool = False
    # ZeRO-Offload: fp32 master weights, Adam moments and the fp32 gradients live in host memory
    # (and the AdamW step runs on the CPU); the GPU keeps bf16 weights and gradients.
    offload_optimizer: Literal["none", "cpu"] = "none"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    reliance_every: int = Field(default=25, ge=0)  # cross-modal reliance metric; 0 disables
    plot_every: int = Field(default=50, ge=0)  # loss-curve PNG artifact; 0: only at the end
    fidelity: FidelitySection = FidelitySection()  # student evaluation while training


class ScalingSection(_Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)  # fractional on small CPU boxes
    gpus_per_worker: float = Field(default=1.0, ge=0.0)  # used only when use_gpu
    max_failures: int = Field(default=1, ge=-1)  # Ray FailureConfig; -1 = unlimited
    # Memory of one GPU (GB = 1e9 bytes) the memory plan of `omniforcing check` must fit into.
    gpu_memory_gb: float = Field(default=80.0, gt=0.0)


class StorageSection(_Strict):
    path: str = "runs"  # local folder or s3://bucket/prefix (checkpoints, exports)
    endpoint: str | None = None  # custom S3 endpoint, e.g. http://127.0.0.1:5555
    region: str = "us-east-1"


class MlflowSection(_Strict):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in run folder
    experiment: str = "omniforcing"


class DistillSection(_Strict):
    """Typed home of the distillation stages (`ode`, `self-forcing`); extended by that stage.

    Defaults are the paper-era (V1) values wherever the paper's code generations differ.
    """

    class Role(_Strict):
        """One network of the distillation: where its weights come from, whether it trains."""

        init_from: str = "teacher"  # teacher | random | Bundle dir / models:/ / runs:/ / run id
        trainable: bool = True

    teacher: str | None = None  # `shipped`, Bundle dir, models:/ URI or MLflow run id
    student: Role = Role()  # causal, fresh audio sinks on top of the teacher's weights
    critic: Role = Role()  # bidirectional fake-score network (self-forcing only)
    student_sigmas: list[float] = [1.0, 0.7507, 0.5448]  # few-step σ list of the student (V1)
    critic_updates_per_generator: int = Field(default=5, ge=1)  # TTUR 5:1
    critic_lr: float | None = Field(default=None, gt=0.0)  # None: train.lr
    cfg_video: float = Field(default=5.0, ge=0.0)  # DMD real-score CFG, video (V1 stage 3)
    cfg_audio: float = Field(default=9.0, ge=0.0)  # DMD real-score CFG, audio (V1 stage 3)
    ode_cfg_video: float = Field(default=3.0, ge=0.0)  # trajectory CFG, video (V1 stage 1 / V2)
    ode_cfg_audio: float = Field(default=5.0, ge=0.0)  # trajectory CFG, audio
    teacher_steps: int = Field(default=40, ge=1)  # Euler steps of the teacher's trajectories
    teacher_mode: Literal["local", "actors"] = "local"  # ode: actors = Ray pool scores batches
    # self-forcing DMD real score: `local` = each trainer holds the frozen teacher; `actors` =
    # trainers send x_t to a pool of `actors` named teacher actors and get the CFG x0 back.
    real_score: Literal["local", "actors"] = "local"
    actors: int = Field(default=1, ge=1)  # teacher actor pool size (teacher_mode / real_score)
    actor_cpus: float = Field(default=0.5, gt=0.0)  # logical CPUs per teacher actor
    # GPUs per teacher actor (Ray num_gpus, fractions share a card): > 0 runs the teacher DiT on
    # CUDA in bf16 (ODE state, CFG and x0 in fp32); 0 keeps it on the actor's CPU in fp32 with
    # one thread.
    actor_gpus: float = Field(default=0.0, ge=0.0)
    actor_batch_size: int = Field(default=2, ge=1)  # rows per map_batches call
    trajectory_cache: str | None = None  # folder of trajectory shards (None: stream, no cache)
    # ode: share of samples whose blocks before a random one are clean (the streaming student's
    # context); 0: every block at an independent trajectory point (CausVid's ODE init).
    ode_clean_context: float = Field(default=0.0, ge=0.0, le=1.0)
    ode_weight_video: float = Field(default=1.0, ge=0.0)  # ODE regression loss weights (V1)
    ode_weight_audio: float = Field(default=0.16, ge=0.0)
    dmd_weight_video: float = Field(default=1.0, ge=0.0)  # DMD generator loss weights
    dmd_weight_audio: float = Field(default=1.0, ge=0.0)
    min_timestep: int = Field(default=20, ge=1, le=1000)  # DMD t ~ U{min..max} → σ
    max_timestep: int = Field(default=980, ge=1, le=1000)
    # V1: DMD and critic on the last block only. Our rollout is V2's (gradient at each block's
    # exit step, committed caches detached), so under last_block the earlier blocks' outputs get
    # no gradient; every_block (V2) reaches them. 240 steps of it held the ODE student's sync and
    # did not lift it (RESULTS, session 20), so the V1 default stays.
    loss_scope: Literal["every_block", "last_block"] = "last_block"
    prefix: Literal["generated", "clean_from_teacher"] = "clean_from_teacher"  # block 0 source
    grad_norm_every: int = Field(default=1, ge=0)  # per-modality grad norms; 0 disables

    @model_validator(mode="after")
    def _check_student_sigmas(self) -> DistillSection:
        # The rule model.bundle applies when the exported student is loaded: fail now, not then.
        from model.flow import student_sigmas_ok

        if not student_sigmas_ok(self.student_sigmas):
            raise ValueError(
                "distill.student_sigmas must be decreasing numbers in (0, 1], "
                f"got {self.student_sigmas}"
            )
        return self

    def actor_resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) the teacher actors take beside the trainers: `actors` x (`actor_cpus`,
        `actor_gpus`) when a stage runs its teacher as Ray actors (`teacher_mode` for `ode`,
        `real_score` for `self-forcing`), else (0, 0). A job runs one stage, so at most one
        pool is alive: both modes set still count once. Used by `omniforcing check` and by
        `pipeline.trainer.ensure_ray`, so the check and the local instance agree."""
        if "actors" not in (self.teacher_mode, self.real_score):
            return 0.0, 0.0
        return self.actors * self.actor_cpus, self.actors * self.actor_gpus


class JobConfig(_Strict):
    schema_version: int = SCHEMA_VERSION
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    storage: StorageSection = StorageSection()
    mlflow: MlflowSection = MlflowSection()
    distill: DistillSection = DistillSection()

    def build_model_config(self, causal: bool) -> Any:
        """The model.ModelConfig of this job; `causal` is the stage's default."""
        from model import ModelConfig, preset

        d = _deep_merge(preset(self.model.preset).to_dict(), self.model.overrides)
        d["causal"] = causal if self.model.causal is None else self.model.causal
        if self.model.num_sinks is not None:
            d["num_sinks"] = self.model.num_sinks
        return ModelConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value); the value is parsed as YAML so `3`, `true`, `[1,2]` type."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty component in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({err})") from None
    return parts, value


def apply_override(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set raw[parts...] = value, creating mappings; a non-mapping on the way is an error."""
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section"
            )
        node = nxt
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> JobConfig:
    """Read a YAML file (or start from defaults), apply `--set` overrides, validate strictly."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return validate(raw, source=str(path) if path else "<defaults>")


def validate(raw: dict[str, Any], source: str = "<dict>") -> JobConfig:
    """Validate a raw mapping; every problem is reported with its dotted key path."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid config\n" + _format_errors(err)) from None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)
