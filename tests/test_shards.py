"""Shard writing (local and S3 through a real moto endpoint), index.json, tolerant tar reading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from data.cli import register
from data.reader import iter_samples
from data.shards import (
    RawSample,
    ShardWriter,
    TarProblem,
    iter_tar,
    read_index,
    resolve,
    write_tar,
)
from data.synth import synth

SMALL = dict(seconds=1.04, height=32, width=32)


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_tar_is_sorted_and_reproducible(tmp_path):
    members = {"b.mp4": b"2", "a.json": b"{}", "a.mp4": b"1"}
    write_tar(str(tmp_path / "x.tar"), members)
    write_tar(str(tmp_path / "y.tar"), dict(reversed(members.items())))
    assert (tmp_path / "x.tar").read_bytes() == (tmp_path / "y.tar").read_bytes()
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert tar.getnames() == ["a.json", "a.mp4", "b.mp4"]
        assert {m.mtime for m in tar.getmembers()} == {946684800}
    items = list(iter_tar(open(tmp_path / "x.tar", "rb"), "x.tar"))
    assert [(i.key, sorted(i.members)) for i in items] == [("a", ["json", "mp4"]), ("b", ["mp4"])]


def test_iter_tar_reports_cuts_and_odd_members(tmp_path):
    path = tmp_path / "s.tar"
    write_tar(str(path), {"a.json": b"{}", "a.mp4": b"x" * 2000, "b.json": b"{}", "nosuffix": b"z"})
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        info = {m.name: m for m in tar.getmembers()}
    mid = list(iter_tar(io.BytesIO(data[: info["a.mp4"].offset_data + 100]), "s.tar"))
    assert [type(i) for i in mid] == [TarProblem] and mid[0].kind == "truncated_tar"
    boundary = list(iter_tar(io.BytesIO(data[: info["b.json"].offset]), "s.tar"))
    assert isinstance(boundary[0], RawSample) and boundary[0].key == "a"
    assert boundary[1].kind == "truncated_tar" and "end-of-archive" in boundary[1].message
    whole = list(iter_tar(io.BytesIO(data), "s.tar"))
    assert [getattr(i, "kind", None) for i in whole] == [None, "garbage_member", None]
    junk = list(iter_tar(io.BytesIO(b"\x01" * 3000), "j.tar"))
    assert [i.kind for i in junk] == ["unreadable_shard"]


def test_writer_index_atomic_and_key_checks(tmp_path):
    out = tmp_path / "shards"
    writer = ShardWriter(str(out), shard_size=2)
    for i in range(5):
        writer.add(f"k-{i}", bytes([i]) * 10, {"caption": str(i)})
    with pytest.raises(ValueError, match="'bad.key'"):
        writer.add("bad.key", b"", {})
    with pytest.raises(ValueError, match="duplicate"):
        writer.add("k-4", b"", {})
    index = writer.close()
    assert sorted(os.listdir(out)) == ["index.json"] + [f"shard-00000{i}.tar" for i in range(3)]
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1] and index["total_samples"] == 5
    for s in index["shards"]:
        blob = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(blob) and s["sha256"] == hashlib.sha256(blob).hexdigest()
    assert read_index(str(out)) == index
    assert index["total_bytes"] == sum(s["bytes"] for s in index["shards"])


def test_synth_is_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synth(a, 3, shard_size=2, seed=5, **SMALL)
    synth(b, 3, shard_size=2, seed=5, **SMALL)
    synth(c, 3, shard_size=2, seed=6, **SMALL)
    names = sorted(os.listdir(a))
    assert names == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    for name in names:
        assert open(f"{a}/{name}", "rb").read() == open(f"{b}/{name}", "rb").read(), name
    assert open(f"{a}/index.json").read() != open(f"{c}/index.json").read()
    meta = json.loads(tarfile.open(f"{a}/shard-000000.tar").extractfile("clip-000000.json").read())
    assert meta["fps"] == 24 and meta["seconds"] == 1.04 and meta["caption"]
    sa, sb = list(iter_samples(a)), list(iter_samples(b))
    assert [s.key for s in sa] == ["clip-000000", "clip-000001", "clip-000002"]
    for x, y in zip(sa, sb, strict=True):
        np.testing.assert_array_equal(x.frames, y.frames)
        np.testing.assert_array_equal(x.audio, y.audio)


def test_cli_synth_to_s3_and_read_back(tmp_path, s3_bucket):
    target = f"{s3_bucket}/train/v1"
    args = ["data", "synth", "--out", target, "--clips", "3", "--shard-size", "2"]
    args += ["--seconds", "1.04", "--height", "32", "--width", "32", "--seed", "9"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{") :])["samples"] == 3
    fs, root = resolve(target)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    local = str(tmp_path / "local")
    synth(local, 3, shard_size=2, seed=9, **SMALL)
    assert fs.cat_file(f"{root}/index.json") == open(f"{local}/index.json", "rb").read()
    remote = list(iter_samples(target))
    assert [s.key for s in remote] == [s.key for s in iter_samples(local)]
    np.testing.assert_array_equal(remote[2].frames, list(iter_samples(local))[2].frames)


def test_cli_rejects_bad_arguments(tmp_path):
    result = CliRunner().invoke(_cli(), ["data", "synth", "--out", str(tmp_path), "--clips", "0"])
    assert result.exit_code != 0 and "clips" in result.output
    result = CliRunner().invoke(
        _cli(), ["data", "synth", "--out", str(tmp_path), "--clips", "1", "--seconds", "1.0"]
    )
    assert result.exit_code != 0 and "1 + 8k" in result.output
