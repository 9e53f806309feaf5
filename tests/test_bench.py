"""`omniforcing bench`: the generated region of RESULTS.md replaces itself and nothing else.

Runs the real quick suites (size on the meta device, streaming with the tiny preset) through the
CLI into a temporary RESULTS.md. Asserts structure and that figures are numbers; never timings.
Also: a failing suite keeps the others' figures, the data suite's S3 endpoint cleans up after
itself, and the train suite's in-code tiny config is configs/tiny.yaml.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

import benchmarks.data
from benchmarks.report import BEGIN, END, replace_region
from benchmarks.train import TINY
from data.local_s3 import ENV_KEYS, local_s3
from pipeline.cli import app

HAND = (
    "# Benchmark results\n\nHand-written intro: how to read the figures.\n\n"
    "## Teacher quality\n\n| metric | value |\n|---|---|\n| sync | 22.6 % |\n\n"
    "## Sinks ablation\n\nNo explosion without sinks at this scale.\n"
)
NUM = r"[-+]?[\d,]+(?:\.\d+)?"


def _outside(text: str) -> str:
    b, e = text.index(BEGIN), text.index(END) + len(END)
    return text[:b] + text[e:]


def _row(text: str, label: str, value: str) -> None:
    pattern = rf"^\| {re.escape(label)} \| {value} \|$"
    assert re.search(pattern, text, re.M), f"no row {label!r} with a numeric value"


def _bench(tmp_path, only: str) -> str:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "raw.json"
    args = ["bench", "--quick", "--only", only, "--out", str(out), "--json", str(raw)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(raw.read_text())["suites"].keys() == set(only.split(","))
    return out.read_text()


def test_bench_writes_its_region_and_keeps_hand_written_text(tmp_path):
    (tmp_path / "RESULTS.md").write_text(HAND)
    first = _bench(tmp_path, "size,streaming")
    assert first.count(BEGIN) == first.count(END) == 1
    # The region goes after the intro, before the first section; the rest is byte for byte.
    intro, sections = HAND.split("## Teacher quality")
    assert first.startswith(intro + BEGIN)
    assert first.endswith(f"{END}\n\n## Teacher quality{sections}")
    for key in ("CPU", "logical cores", "RAM", "GPU", "software"):
        assert re.search(rf"^\| {key} \| \S", first, re.M), key
    assert "omniforcing bench --only size,streaming --device cpu --quick" in first
    _row(first, "total", rf"{NUM} k \| {NUM} M \| {NUM} B")
    _row(first, "ratio block 10 / block 5 (target ≤ 1.1)", NUM)
    _row(first, "block at 8 s: recompute-the-prefix / cached", f"{NUM}×")
    _row(
        first,
        "speed-up teacher / student vs FLOP ratio 40·P/(K+1) (share)",
        rf"{NUM}× of 20 \({NUM}%\)",
    )
    _row(first, "time to first chunk (prefix + first second)", f"{NUM} ms")
    _row(first, "real-time factor (5 s / student time)", f"{NUM}×")
    _row(first, "generated fps after the first chunk", NUM)
    g = "`GraphedStream` (CUDA graphs on a GPU, else its static buffers eagerly)"
    _row(first, f"{g}: time to first chunk, fps after it", f"{NUM} ms, {NUM}")
    # fp32 on the CPU: the static buffers give the eager path's latents (to rounding).
    diff = re.search(rf"^\| {re.escape(g)}: largest latent difference .* \| (\S+) \|$", first, re.M)
    assert diff and float(diff.group(1)) < 1e-4

    # A rerun replaces the region (now the size table alone) instead of appending a second one.
    second = _bench(tmp_path, "size")
    assert second.count(BEGIN) == second.count(END) == 1
    assert _outside(second) == _outside(first)
    assert "### Model size" in second and "### Streaming" not in second


def test_region_markers_are_never_guessed():
    assert replace_region("", "x") == f"{BEGIN}\nx\n{END}\n"
    assert replace_region("# T\n\nintro\n", "x") == f"# T\n\nintro\n\n{BEGIN}\nx\n{END}\n"
    with pytest.raises(ValueError, match="unbalanced"):
        replace_region(f"# T\n{END}\n{BEGIN}\n", "x")
    with pytest.raises(ValueError, match="unbalanced"):
        replace_region(f"# T\n{BEGIN}\n", "x")


def test_a_failing_suite_keeps_the_others_and_exits_non_zero(tmp_path, monkeypatch):
    out, raw = tmp_path / "RESULTS.md", tmp_path / "raw.json"

    def broken(**_: object) -> dict:
        # --json is written after every suite: size's figures are on disk before data runs.
        assert "size" in json.loads(raw.read_text())["suites"]
        raise RuntimeError("moto_server\nwent away")

    monkeypatch.setattr(benchmarks.data, "run", broken)
    args = ["bench", "--quick", "--only", "size,data", "--out", str(out), "--json", str(raw)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    text = out.read_text()
    assert re.search(r"^suite data failed: RuntimeError: moto_server went away$", text, re.M)
    assert "### Model size" in text  # the suite that finished is still rendered
    dumped = json.loads(raw.read_text())
    assert dumped["suites"].keys() == {"size"}
    assert dumped["failed"] == {"data": "RuntimeError: moto_server went away"}
    assert dumped["wall_s"].keys() == {"size", "data"}


def test_local_s3_restores_the_environment_and_reaps_the_server(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "outer")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    before = {k: os.environ.get(k) for k in ENV_KEYS}
    me = psutil.Process()
    with pytest.raises(RuntimeError, match="suite body failed"):
        with local_s3("bench-test", key="bench") as url:
            assert os.environ["AWS_ENDPOINT_URL"] == url
            assert os.environ["AWS_ACCESS_KEY_ID"] == "bench"
            port = url.rsplit(":", 1)[1]
            (server,) = [c for c in me.children() if port in c.cmdline()]
            raise RuntimeError("suite body failed")
    assert {k: os.environ.get(k) for k in ENV_KEYS} == before
    assert server.pid not in {c.pid for c in me.children()}  # waited for, not a zombie
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_train_suite_config_is_configs_tiny_yaml():
    # The bench builds it in code (configs/ is not installed); this keeps the two equal.
    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert TINY == yaml.safe_load(yaml_path.read_text())


def test_a_failing_graphed_section_keeps_the_streaming_figures(monkeypatch):
    import torch

    import benchmarks.streaming as bs

    def broken(*_: object) -> dict:
        raise RuntimeError("capture | failed")

    monkeypatch.setattr(bs, "_graphs_section", broken)
    out = bs.run_preset("tiny", torch.device("cpu"), torch.float32, 12, 5, 4, graphs=True)
    assert out["graphs_error"] == "RuntimeError: capture | failed" and "graphed" not in out
    assert out["teacher_5s_s"] > 0 and out["speedup_teacher_over_student"] > 0
