"""The README's main command, `omniforcing demo`, end to end at tiny scale (same code path).

Real parts: local Ray, DeepSpeed engines for `ode` and `self-forcing`, the MLflow server fixture
(sqlite + S3 artifacts), the model registry, a Ray Serve app over HTTP, the streaming client.
The teacher comes from `--teacher scratch`: codecs fitted on the demo's shards and a `tiny`
teacher trained for 2 steps by the real `teacher` stage, then distilled like the shipped one.
"""

import json

from typer.testing import CliRunner

from data.mp4 import DecodeSpec, decode_mp4
from pipeline.cli import app


def test_demo_end_to_end_at_tiny_scale(tmp_path, ray_local, mlflow_uri):
    from ray import serve

    serve.shutdown()  # the demo starts its own Serve app on a free port
    clip = tmp_path / "clip.mp4"
    args = ["demo", "--out", str(tmp_path / "run"), "--config", "configs/tiny.yaml"]
    args += ["--teacher", "scratch", "--teacher-config", "configs/tiny.yaml"]
    args += ["--teacher-steps", "2"]
    args += ["--clips", "4", "--ode-steps", "2", "--sf-steps", "1", "--sf-evals", "1"]
    args += ["--seconds", "1", "--clip", str(clip), "--eval-clips", "1", "--name", "demo-student"]
    for kv in ("data.source=shards", "distill.teacher_steps=3", "train.checkpoint_every=1"):
        args += ["--set", kv]
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        serve.shutdown()
    assert result.exit_code == 0, result.output
    # The streamed clip is a playable mp4 of the requested length, fps and sample rate.
    dec = decode_mp4(clip.read_bytes(), DecodeSpec(fps=24, sample_rate=16000, channels=1))
    assert dec.frames.shape == (1 + 24, 32, 32, 3)
    assert dec.fps == 24 and dec.source_sample_rate == 16000
    assert dec.audio.shape == (1, 16000 + 640)
    # The student is in the registry under the alias, and the evaluation compared both models.
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias("demo-student", "champion")
    assert version.run_id
    report = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert set(report) == {"real", "codec", "teacher", "student"}
    assert "contact_recall" in report["student"] and "chance_recall" in report["teacher"]
    # What a viewer sees, beside the real clips it should look like.
    assert report["real"]["ball_visible_frac"] == 1.0
    assert "ball_contrast" in report["student"]
    assert (tmp_path / "run" / "eval" / "eval.png").stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "ball in frames / contrast" in summary["rows"]
    # The comparison is logged to the demo's parent run: metrics and the PNG.
    parent = MlflowClient().get_run(summary["runs"]["parent"])
    assert "eval.student.contact_recall" in parent.data.metrics
    arts = [a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "eval")]
    assert "eval/eval.png" in arts
    assert summary["promoted"]["uri"] == "models:/demo-student@champion"
    assert summary["stream"]["chunks"] == 2 and str(clip) in summary["rows"]["clip"]
    assert (
        f"on {report['student']['n_clips']} clips" in summary["rows"]["contacts with onset ≤40 ms"]
    )
    assert set(summary["runs"]) == {"parent", "ode", "self-forcing"}
    # Self-Forcing evaluated its start (the ODE student) and its step; the promoted one is the
    # best of those where a figure was defined, and the summary says which.
    sf_run = summary["runs"]["self-forcing"]
    evals = MlflowClient().get_metric_history(sf_run, "fidelity/eval_s")
    assert sorted(m.step for m in evals) == [0, 1]
    best = MlflowClient().get_run(sf_run).data.tags.get("omniforcing.best_step")
    assert summary["promoted"]["which"] == ("best" if best else "last")
    start = " (the stage's starting weights)" if best == "0" else ""
    assert summary["rows"]["promoted"].startswith(f"step {best or 1}{start} of run")
    # The scratch teacher: codecs fitted on the shards, trained, exported, and the one distilled.
    assert (tmp_path / "run" / "codecs" / "codec.json").is_file()
    teacher_cfg = next((tmp_path / "run" / "teacher").rglob("config.json"))
    assert json.loads(teacher_cfg.read_text())["model"]["causal"] is False


def test_summary_shows_the_interval_where_the_report_has_one():
    from deploy.demo import _ci

    assert _ci({"r": 0.625, "r_lo": 0.5, "r_hi": 0.71}, "r") == "0.62 [0.50, 0.71]"
    assert _ci({"r": 0.625}, "r") == "0.62" and _ci({}, "r") == "n/a"


def test_stage_warmup_fits_the_demo_budget():
    """The demo's short stages get a warm-up of at most a tenth of their steps (configs/demo.yaml
    has 100, sized for 2000 steps: 40 Self-Forcing steps would never reach the set rate); the
    schedule then reaches the full rate and starts its decay inside the stage."""
    from pathlib import Path

    from deploy.demo_steps import stage_config
    from pipeline.config import load_config, validate
    from pipeline.parallelize import lr_multiplier

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").to_dict()
    ode = validate(stage_config(base, "ode", 150))
    sf = validate(stage_config(base, "self-forcing", 40, ode_run="abc"))
    assert (ode.train.warmup_steps, sf.train.warmup_steps) == (15, 4)
    assert sf.distill.student.init_from == "abc" and ode.distill.student.init_from != "abc"
    assert max(lr_multiplier(s, sf) for s in range(40)) == 1.0
    assert lr_multiplier(39, sf) < 0.2  # decayed toward the floor by the end
    long = validate(stage_config(base, "ode", 2000))
    assert long.train.warmup_steps == base["train"]["warmup_steps"]  # long runs keep the config's


def test_self_forcing_stage_is_evaluated_from_its_start_and_keeps_the_config_schedule():
    """The demo's Self-Forcing stage runs at its own rate and evaluates its student at the start
    (the ODE student) and `evals` times after, on prompts apart from the demo's final comparison;
    the ODE stage is left alone, and a config that schedules `train.fidelity` itself wins."""
    from pathlib import Path

    from deploy.demo_steps import EVAL_SEED, stage_config
    from pipeline.config import load_config, validate

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").to_dict()
    sf = validate(stage_config(base, "self-forcing", 24, "abc", lr=1e-4, evals=4)).train
    assert sf.lr == 1e-4 and base["train"]["lr"] == 3e-4
    assert (sf.fidelity.every, sf.fidelity.clips, sf.fidelity.at_start) == (6, 8, True)
    assert (
        sf.fidelity.teacher is False and abs(sf.fidelity.seed - EVAL_SEED) >= 8
    )  # not the final prompts
    ode = validate(stage_config(base, "ode", 150, lr=1e-4, evals=4)).train
    assert ode.lr == 3e-4 and ode.fidelity.every == 0
    assert (
        validate(stage_config(base, "self-forcing", 24, "abc", evals=0)).train.fidelity.every == 0
    )
    base["train"]["fidelity"] = {"every": 5, "clips": 2}
    own = validate(stage_config(base, "self-forcing", 24, "abc", evals=4)).train.fidelity
    assert (own.every, own.clips, own.teacher) == (5, 2, True)


def test_self_forcing_batch_and_scope_apply_to_that_stage_only():
    """`--sf-batch` / `--sf-scope` set the Self-Forcing stage's per-worker batch and loss scope;
    the ODE stage keeps the config's batch, and a bad scope is named by its config key."""
    from pathlib import Path

    import pytest

    from deploy.demo_steps import stage_config
    from pipeline.config import load_config, validate

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").to_dict()
    sf = validate(stage_config(base, "self-forcing", 64, "abc", batch=1, scope="every_block"))
    ode = validate(stage_config(base, "ode", 150, batch=1, scope="every_block"))
    assert (sf.data.batch_size, sf.distill.loss_scope) == (1, "every_block")
    assert ode.data.batch_size == base["data"]["batch_size"] == 4
    with pytest.raises(ValueError, match="distill.loss_scope"):
        validate(stage_config(base, "self-forcing", 64, "abc", scope="all_blocks"))
