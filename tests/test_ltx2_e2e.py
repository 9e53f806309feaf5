"""An imported LTX-2 teacher distilled end to end at tiny size, on the CPU (issue 22 item 4).

Tiny random diffusers/transformers components (tests/ltx2_tiny.py) saved as an LTX2Pipeline
folder → `omniforcing import ltx2` → synthetic shards at the tiny VAE's frame size (64×64 → 2×2
latents) → `omniforcing train ode` then `train self-forcing` (from the ODE student), 2 steps each
on the real trainer (local Ray, one DeepSpeed ZeRO-2 worker to keep it cheap: the 2-worker path
is tests/test_ode_stage.py's and test_self_forcing.py's; the MLflow server fixture), the Ray
Data codec actors encoding with the teacher bundle's own VAEs (`data.codecs: auto`), the stages
conditioning on its Gemma + connectors → `omniforcing promote` → `omniforcing generate` streams
an mp4 from the promoted student through LTX-2's decoders.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from tests import ltx2_tiny as tiny

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def train(stage: str, sets: list[str]) -> str:
    """`omniforcing train <stage>` on the tiny config; returns the run id it prints."""
    out = cli(
        "train", stage, "--config", "configs/tiny.yaml", *sum([["--set", s] for s in sets], [])
    )
    return re.search(rf"{stage} done: run ([0-9a-f]{{32}})", out).group(1)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two Ray Train stages: 15 min on a 2-core box at load 25-30
def test_imported_ltx2_teacher_distils_promotes_and_streams(
    tmp_path: Path, ray_local: None, mlflow_uri: str
) -> None:
    from data.mp4 import DecodeSpec, decode_mp4
    from data.reader import iter_samples
    from model import Bundle
    from pipeline.config import load_config
    from pipeline.distill.data_codecs import (
        TeacherCodecs,
        codec_classes,
        codec_dir,
        codec_source,
    )
    from pipeline.registry import load_bundle

    src, teacher, shards = tmp_path / "src", tmp_path / "teacher", tmp_path / "shards"
    tiny.pipeline_folder(src)
    cli("import", "ltx2", "--from", src, "--out", teacher, "--dtype", "float32",
        "--latent-hw", "2,2", "--max-len", tiny.MAX_LEN)  # fmt: skip
    sets = [
        "data.source=shards",
        f"data.path={shards}",
        f"distill.teacher={teacher}",
        "distill.teacher_steps=2",
        "distill.critic_updates_per_generator=1",
        f"storage.path={tmp_path / 'runs'}",
        "mlflow.experiment=ltx2-e2e",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.reliance_every=0",
        "scaling.num_workers=1",
    ]
    cli("data", "synth", "--out", shards, "--clips", 4, "--seconds", 1 + 1 / 24, "--balls", 1)

    # auto: the distillation stages encode with the teacher's VAEs; the teacher stage never.
    cfg = load_config("configs/tiny.yaml", sets)
    source = codec_source(cfg, "ode")
    assert isinstance(source, TeacherCodecs) and codec_source(cfg, "teacher") == codec_dir(cfg)
    video, audio = source()  # what each codec actor does
    clip = next(iter(iter_samples(str(shards))))
    assert video.encode(torch.from_numpy(clip.frames)).shape == (4, *tiny.LATENT_HW, 8)
    assert audio.encode(torch.from_numpy(clip.audio)).shape == (26, 8)

    ode = train("ode", sets)
    sf = train("self-forcing", [*sets, f"distill.student.init_from={ode}"])
    cli("promote", "--run", sf, "--name", "ltx2-student", "--alias", "champion")
    student = load_bundle("models:/ltx2-student@champion")
    assert student.config.arch == "ltx2" and student.config.causal and student.config.sinks
    assert type(student.video_codec).__name__ == "LTX2VideoCodec"
    assert type(student.text_encoder).__name__ == "LTX2TextEncoder"
    # A registered bundle's codecs alone are what a codec actor downloads and reads.
    assert codec_classes("models:/ltx2-student@champion")["audio"] == "LTX2AudioCodec"
    assert TeacherCodecs("models:/ltx2-student@champion")()[0].latent_hw == tiny.LATENT_HW
    t_state = Bundle.from_pretrained(teacher).model.state_dict()
    moved = [
        (v - t_state[k]).abs().max().item()
        for k, v in student.model.state_dict().items()
        if k in t_state
    ]
    assert len(moved) == len(t_state) and max(moved) > 1e-4  # trained away from the teacher

    out = tmp_path / "clip.mp4"
    cli("generate", "--model", "models:/ltx2-student@champion", "--prompt", "a red ball",
        "--seconds", 1, "--out", out)  # fmt: skip
    dec = decode_mp4(out.read_bytes(), DecodeSpec(fps=24, sample_rate=16000, channels=2))
    assert dec.frames.shape == (25, *tiny.FRAME_HW, 3) and dec.audio.shape[0] == 2


def test_data_codecs_pick_the_teachers_learned_codecs(tmp_path: Path) -> None:
    """`data.codecs`: auto follows the teacher bundle's codec classes (config.json alone)."""
    import json

    from pipeline.config import ConfigError, load_config
    from pipeline.distill.data_codecs import TeacherCodecs, codec_source

    def teacher(name: str, video: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        codecs = {"video": {"class": video}, "audio": {"class": "EnvelopeAudioCodec"}}
        (d / "config.json").write_text(json.dumps({"codecs": codecs}))
        (d / "manifest.json").write_text("{}")
        return d

    ltx2, ours = teacher("ltx2", "LTX2VideoCodec"), teacher("ours", "CellVideoCodec")

    def source(ref: Path, stage: str, mode: str = "auto") -> object:
        sets = [f"distill.teacher={ref}", f"data.codecs={mode}", "data.codec_dir=/fitted"]
        return codec_source(load_config("configs/tiny.yaml", sets), stage)

    assert isinstance(source(ltx2, "ode"), TeacherCodecs)
    assert isinstance(source(ltx2, "self-forcing"), TeacherCodecs)
    assert source(ours, "ode") == "/fitted" and source(ltx2, "teacher") == "/fitted"
    assert isinstance(source(ours, "ode", "teacher"), TeacherCodecs)
    assert source(ltx2, "ode", "codec_dir") == "/fitted"
    with pytest.raises(ValueError, match="stage 'teacher' has no teacher bundle"):
        source(ours, "teacher", "teacher")
    with pytest.raises(ConfigError, match="data.codecs"):
        source(ours, "ode", "vae")
