"""Which codecs the data pipeline encodes clips with (`data.codecs`), and a loader of a teacher
bundle's own codecs for the Ray Data codec actors.

The distillation stages (`ode`, `self-forcing`) regress onto and score with the teacher, and the
student they export carries the teacher's codecs, so their latents must be in the teacher's latent
space. Two kinds of codecs exist:
- the embedded ones (`model.codecs`: CellVideoCodec, EnvelopeAudioCodec) are fitted per data set
  and kept in a codec folder (`data.codec_dir`, written by `omniforcing data fit-codec`; the demo
  writes its teacher's there);
- learned ones (LTX-2's VAEs + vocoder, `pipeline.ltx2`) exist only inside a teacher bundle.

`data.codecs`:
- `auto` (default): the distillation stages encode with the teacher bundle's codecs when they are
  learned ones, else with `data.codec_dir` (what every job did before the key existed);
- `teacher`: the distillation stages always encode with the teacher bundle's codecs;
- `codec_dir`: always `data.codec_dir`.
The `teacher` stage has no teacher bundle and always uses `data.codec_dir`.

The actors read only config.json and codecs.safetensors of the bundle (checked against its
manifest): never its DiT or text encoder. It holds no Ray Data code (data/ray_data.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig

DISTILL_STAGES = ("ode", "self-forcing")
CODEC_FILES = ("config.json", "manifest.json", "codecs.safetensors")


def codec_dir(cfg: JobConfig) -> str:
    """`data.codec_dir`, or <data.path>/codecs when unset."""
    return cfg.data.codec_dir or cfg.data.path.rstrip("/") + "/codecs"


def _local(ref: str, names: tuple[str, ...]) -> Path:
    """A local folder with `names` of the bundle `ref` (a folder, run id, models:/ or runs:/)."""
    from pipeline.distill.roles import bundle_uri
    from pipeline.registry import bundle_files

    uri = bundle_uri(ref)
    dst = None if Path(uri).is_dir() else tempfile.mkdtemp(prefix="omni-codecs-")
    return bundle_files(uri, names, dst)


def codec_classes(ref: str) -> dict[str, str]:
    """{"video": class name, "audio": class name} from the bundle's config.json alone."""
    config = json.loads((_local(ref, ("config.json",)) / "config.json").read_text())
    codecs = config.get("codecs") if isinstance(config, dict) else None
    if not isinstance(codecs, dict):
        raise ValueError(f"distill.teacher={ref!r}: config.json has no codecs (not a bundle?)")
    return {kind: str(codecs[kind]["class"]) for kind in ("video", "audio")}


def learned(classes: dict[str, str]) -> bool:
    """Whether a bundle's codecs are other than the embedded, per-data-set fitted ones."""
    from model.codecs import _CODECS

    return any(name not in _CODECS for name in classes.values())


class TeacherCodecs:
    """A picklable zero-argument loader of a teacher bundle's codecs (`data.ray_data.CodecSource`):
    each codec actor calls it once and reads only what the codecs need."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def __call__(self) -> tuple[Any, Any]:
        import pipeline  # noqa: F401 — registers LTX-2's codec classes in this actor
        from model.bundle import read_codecs

        return read_codecs(_local(self.ref, CODEC_FILES))

    def __repr__(self) -> str:
        return f"TeacherCodecs({self.ref!r})"


def codec_source(cfg: JobConfig, stage: str) -> str | TeacherCodecs:
    """What the codec actors of `stage`'s dataset encode with (module docstring)."""
    mode, ref = cfg.data.codecs, cfg.distill.teacher
    if stage not in DISTILL_STAGES or mode == "codec_dir":
        if mode == "teacher" and stage not in DISTILL_STAGES:
            raise ValueError(
                f"data.codecs=teacher: stage {stage!r} has no teacher bundle to take codecs "
                "from; use data.codecs=auto or codec_dir"
            )
        return codec_dir(cfg)
    if not ref:
        raise ValueError("distill.teacher is not set: give a teacher Bundle dir or models:/ URI")
    if mode == "teacher" or learned(codec_classes(ref)):
        return TeacherCodecs(ref)
    return codec_dir(cfg)
