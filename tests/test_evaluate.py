"""`omniforcing eval`: sync error follows a known audio shift, mp4 files it did not make are
scored, direction adherence, generation with student and teacher bundles, the codec ceiling,
and the CLI (table, JSON, PNG, MLflow logging against a real tracking server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from data.mp4 import encode_mp4
from data.sync import track_blobs
from data.world import render_clip
from pipeline import evaluate as ev
from pipeline.eval_commands import register

SR = 16000


def _shifted(clips: list[ev.EvalClip], shift_s: float) -> list[ev.EvalClip]:
    """Audio delayed by shift_s (zeros in front, same length): onsets move later by shift_s."""
    n = int(round(shift_s * SR))
    out = []
    for c in clips:
        audio = np.zeros_like(c.audio)
        audio[:, n:] = c.audio[:, : c.audio.shape[1] - n]
        out.append(ev.EvalClip(c.key, c.frames, audio, c.meta))
    return out


@pytest.fixture(scope="module")
def world() -> list[ev.EvalClip]:
    return ev.world_clips(4, 3, seed=0, height=32, width=32)


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_sync_error_follows_audio_shift(world: list[ev.EvalClip]) -> None:
    reports = {ms: ev.evaluate(_shifted(world, ms / 1e3)) for ms in (0, 80, 200)}
    r0, r80, r200 = reports[0], reports[80], reports[200]
    assert r0["median_offset_ms"] < 5 and r0["p90_offset_ms"] < 20
    assert r0["contact_recall"] == 1.0
    assert 0.0 < r0["chance_recall"] < 0.5  # shuffled pairs are far from in sync
    assert abs(r80["median_offset_ms"] - 80) < 10  # the error follows the shift
    assert r80["contact_recall"] < 0.2
    # At 200 ms some contacts meet another contact's onset; the error still grows.
    assert r200["median_offset_ms"] > 120 and r200["p90_offset_ms"] > 180
    assert r200["contact_recall"] < 0.5
    for r in reports.values():  # video is untouched: motion and adherence do not move
        assert r["reversals_per_clip"] == r0["reversals_per_clip"]
        assert r["colour_acc"] == 1.0 and r["pitch_acc"] == 1.0 and r["direction_acc"] == 1.0


def test_direction_adherence_detects_a_wrong_caption(world: list[ev.EvalClip]) -> None:
    flip = {"up": "down", "down": "up", "left": "right", "right": "left"}
    wrong = []
    for c in world:
        words = [
            "-".join(flip[p] for p in w.split("-")) if "-" in w else w
            for w in c.meta["caption"].split()
        ]
        wrong.append(ev.EvalClip(c.key, c.frames, c.audio, {**c.meta, "caption": " ".join(words)}))
    assert ev.evaluate(wrong)["direction_acc"] < 0.5


def test_heading_reads_the_first_leg() -> None:
    t = np.arange(10, dtype=float)
    track = np.stack([16 + 1.0 * t, 16 - 0.8 * t], axis=1)  # right and up (y down)
    assert ev.heading(track, 32, 32) == "up-right"
    bounce = np.stack([16 + np.abs(t - 1.0) * -1.0 + 1.0, 16 + 0.8 * t], axis=1)
    assert ev.heading(bounce, 32, 32) == "down-right"  # V-shape: the leg before the apex
    assert ev.heading_matches("?-left", "up-left") and not ev.heading_matches("up-?", "down-left")


def test_mp4_files_it_did_not_make(tmp_path, cli) -> None:
    for seed in (3, 4):
        c = render_clip(seed, seconds=2.04, height=32, width=32)
        (tmp_path / f"clip{seed}.mp4").write_bytes(encode_mp4(c.frames, c.audio))
        if seed == 3:  # clip4 has no sidecar: scored for sync and motion, not for adherence
            (tmp_path / "clip3.json").write_text(json.dumps({"caption": c.meta["caption"]}))
    clips = ev.clips_from_mp4([str(tmp_path / "*.mp4")])
    assert [c.key for c in clips] == ["clip3", "clip4"]
    assert "caption" in clips[0].meta and "caption" not in clips[1].meta
    report = ev.evaluate(clips)
    # Seen once (session 11, a clean-clone CI): 19 contacts at 37 % where 10 at 100 % are usual,
    # not reproduced in isolation or in suite order; the detail says which side moved next time.
    detail = [
        (len(r["contacts"]), len(r["onsets"]), clips[i].frames.shape)
        for i, r in enumerate(report["clips"])
    ]
    assert report["contact_recall"] >= 0.9 and report["median_offset_ms"] < 15, detail
    assert report["pitch_acc"] == 1.0 and report["colour_acc"] == 1.0
    assert [("direction_ok" in r) for r in report["clips"]] == [True, False]
    out = tmp_path / "out"
    res = cli_invoke(cli, ["eval", str(tmp_path), "--out", str(out)])
    assert "sync error median" in res.output
    saved = json.loads((out / "eval.json").read_text())
    assert saved["clips"]["n_clips"] == 2 and len(saved["clips"]["clips"]) == 2
    assert (out / "eval.png").stat().st_size > 10_000


def test_bad_inputs_name_the_problem(tmp_path, cli) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ev.clips_from_mp4([str(tmp_path / "nope*.mp4")])
    (tmp_path / "bad.mp4").write_bytes(b"not an mp4 at all" * 100)
    with pytest.raises(ValueError, match="bad.mp4"):
        ev.clips_from_mp4([str(tmp_path / "bad.mp4")])
    res = CliRunner().invoke(cli, ["eval", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "exactly one source" in res.output
    missing = str(tmp_path / "no-such-bundle")
    res = CliRunner().invoke(cli, ["eval", "--model", missing, "--out", str(tmp_path)])
    # rich wraps at the runner's terminal width, inside long words too (a long tmp path)
    said = "".join(res.output.split())
    assert res.exit_code == 2 and f"error:--model'{missing}':bundlefolder" in said, res.output
    assert "Traceback" not in res.output and not (tmp_path / "eval.json").exists()


def test_the_shipped_teacher_by_name(tmp_path, cli) -> None:
    """`--model shipped` is the packaged demo teacher, as everywhere a teacher is named."""
    args = ["--clips", "1", "--seconds", "1", "--teacher-steps", "2", "--out", str(tmp_path)]
    cli_invoke(cli, ["eval", "--model", "shipped", *args])
    assert json.loads((tmp_path / "eval.json").read_text())["model"]["n_clips"] == 1


def cli_invoke(app: typer.Typer, args: list[str]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, str]:
    from model.testing import tiny_bundle

    root = tmp_path_factory.mktemp("bundles")
    tiny_bundle(0, causal=True).save_pretrained(root / "student")
    tiny_bundle(1, causal=False).save_pretrained(root / "teacher")
    return {"student": str(root / "student"), "teacher": str(root / "teacher")}


def test_generation_is_seeded_and_uses_world_prompts(bundles) -> None:
    from pipeline.registry import load_bundle

    student = load_bundle(bundles["student"])
    prompts = [c.meta["caption"] for c in ev.world_clips(1, 1, 5, 32, 32)]
    a, b = ev.generate(student, prompts, 1, seed=5), ev.generate(student, prompts, 1, seed=5)
    assert a[0].frames.shape == (25, 32, 32, 3) and a[0].audio.shape == (1, 16640)
    assert np.array_equal(a[0].frames, b[0].frames) and np.array_equal(a[0].audio, b[0].audio)
    assert a[0].meta["caption"] == prompts[0] and a[0].meta["gen_s_per_s"] > 0


def test_compare_teacher_student_with_ceiling_logs_to_mlflow(bundles, cli, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment(f"eval-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    out = tmp_path / "cmp"
    args = ["eval", "--compare", bundles["teacher"], bundles["student"], "--clips", "1"]
    args += [
        "--seconds",
        "1",
        "--teacher-steps",
        "4",
        "--ceiling",
        "--out",
        str(out),
        "--mlflow-run",
        run_id,
    ]
    res = cli_invoke(cli, args)
    for col in ("teacher", "student", "ceiling"):
        assert col in res.output
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved) == {"teacher", "student", "ceiling"}
    assert "gen_s_per_s" in saved["teacher"] and "gen_s_per_s" not in saved["ceiling"]
    run = client.get_run(run_id)
    assert (
        "eval.student.median_offset_ms" in run.data.metrics
        or saved["student"]["median_offset_ms"] != saved["student"]["median_offset_ms"]
    )  # NaN when nothing was detected
    assert run.data.metrics["eval.teacher.n_clips"] == 1.0
    names = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert names == {"eval/eval.json", "eval/eval.png"}


def test_ceiling_keeps_codec_geometry(bundles, world) -> None:
    from pipeline.registry import load_bundle

    rec = ev.ceiling(load_bundle(bundles["student"]), world[:1])
    assert rec[0].frames.shape == world[0].frames.shape  # 73 = 1 + 8 * 9 frames
    assert rec[0].audio.shape[1] >= world[0].audio.shape[1] - 640
    assert rec[0].meta["caption"] == world[0].meta["caption"]


def _open_space_turn(seed: int) -> tuple[ev.EvalClip, float]:
    """A world clip whose video turns back in open space (played backwards from frame k, far from
    every wall) with silence from k on: one reversal that is no contact and has no onset."""
    c = render_clip(seed, seconds=3.04, height=64, width=64, n_balls=1)
    pos = track_blobs(c.frames, 1)[0]  # [F, 2] centre (x, y)
    last = [round(e["time"] * 24) for e in c.meta["events"]]
    for k in range(30, len(pos) - 12):
        far = min(pos[k].min(), 64 - pos[k].max()) > 20
        if far and all(not 0 <= k - f < 12 for f in last):
            break
    else:
        raise AssertionError(f"seed {seed}: no open-space frame to turn at")
    frames = np.concatenate([c.frames[: k + 1], c.frames[k - 1 : k - 11 : -1]])
    audio = np.zeros((1, round((len(frames) - 1) / 24 * SR + 0.04 * SR)), np.float32)
    keep = round(k / 24 * SR)
    audio[:, :keep] = c.audio[:, :keep]
    return ev.EvalClip(f"turn{seed}", frames, audio, dict(c.meta)), k / 24


def test_open_space_reversals_are_not_contacts() -> None:
    clip, t_turn = _open_space_turn(5)
    report = ev.evaluate([clip, _open_space_turn(6)[0]])
    row = report["clips"][0]
    assert any(abs(t - t_turn) < 0.1 for t in row["reversals"])  # the turn is seen ...
    assert all(abs(t - t_turn) > 0.1 for t in row["contacts"])  # ... but is no visible contact
    assert report["wall_frac"] < 1.0 and report["contacts_per_clip"] < report["reversals_per_clip"]
    # Every wall contact keeps its onset; the silent open-space turns count only in the
    # every-reversal share, which is reported beside the contact share.
    assert report["contact_recall"] >= 0.9
    assert report["reversal_recall"] < report["contact_recall"]
