"""A torn or corrupted checkpoint is never loaded: checkpoints in a real S3 endpoint (moto), laid
out as two ranks write them; a folder without its meta.json or a rank's manifest (what a SIGKILL
mid-upload leaves: simulated by uploading part of a checkpoint) is skipped with one log line
naming it; a file whose bytes no longer match its sha256 is refused by name and the previous
checkpoint is used. The real trainer's resume through these paths is in tests/test_resume.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline import integrity

RUN = "ray-run"


def _checkpoint(root: Path, step: int) -> Path:
    """step-<n>/ as Ray Train merges it: rank 0's and rank 1's files, each with its manifest."""
    merged = root / f"step-{step:08d}"
    for rank in (0, 1):
        d = root / f"r{rank}" / merged.name
        (d / "engines" / "net").mkdir(parents=True)
        (d / "engines" / "net" / f"shard{rank}.bin").write_bytes(bytes([step, rank]) * 4000)
        (d / "rng").mkdir()
        (d / "rng" / f"rank{rank}.safetensors").write_bytes(b"rng%d" % rank)
        if rank == 0:
            (d / "meta.json").write_text(json.dumps({"format": 1, "step": step, "world": 2}))
        integrity.write_manifest(d, rank)
        for f in d.rglob("*"):
            if f.is_file():
                target = merged / f.relative_to(d)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
    return merged


@pytest.fixture
def s3_run(s3_bucket: str, tmp_path: Path):
    """s3://bucket/ray-run holding complete step-2 and step-4, and s3fs to edit them."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.clear_instance_cache()
    base = f"{s3_bucket}/{RUN}"
    for step in (2, 4):
        fs.put(str(_checkpoint(tmp_path, step)), f"{base}/", recursive=True)
    return fs, base


def test_torn_checkpoint_is_skipped_with_one_line(s3_run, tmp_path: Path, caplog) -> None:
    fs, base = s3_run
    torn = _checkpoint(tmp_path / "torn", 6)  # a kill mid-upload: rank 1's files never arrived
    fs.put(str(torn / "engines"), f"{base}/step-00000006/", recursive=True)
    fs.put_file(str(torn / "manifest" / "rank0.json"), f"{base}/step-00000006/manifest/rank0.json")
    with caplog.at_level(logging.WARNING, "omniforcing.checkpoint"):
        chosen = integrity.newest_complete(f"{base}/step-00000004")
    assert chosen == f"{base}/step-00000004"
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {base}/step-00000006 skipped: no meta.json (incomplete write)"
    ]
    fs.put_file(str(torn / "meta.json"), f"{base}/step-00000006/meta.json")  # still no rank 1
    assert "manifest/rank1.json missing" in integrity.problem(*_fs_path(f"{base}/step-00000006"))


def test_corrupted_checkpoint_is_refused_by_name(s3_run, caplog) -> None:
    fs, base = s3_run
    victim = f"{base}/step-00000004/engines/net/shard1.bin"
    data = bytearray(fs.cat_file(victim))
    data[100] ^= 0xFF  # one flipped byte, same size
    fs.pipe_file(victim, bytes(data))
    with caplog.at_level(logging.WARNING, "omniforcing.checkpoint"):
        assert integrity.newest_complete(f"{base}/step-00000004") == f"{base}/step-00000002"
    assert caplog.records[0].getMessage() == (
        f"checkpoint {base}/step-00000004 skipped: "
        "engines/net/shard1.bin: sha256 does not match its manifest (corrupted)"
    )
    fs.pipe_file(f"{base}/step-00000002/rng/rank0.safetensors", b"rng")  # truncated
    with pytest.raises(ValueError, match=r"no complete checkpoint .*rank0.safetensors: 3 bytes"):
        integrity.newest_complete(f"{base}/step-00000004")


def test_local_copy_is_checked_before_loading(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path, 2)
    integrity.check_local(d, "s3://b/run/step-00000002")  # intact: no error
    (d / "rng" / "rank1.safetensors").write_bytes(b"rnx1")
    with pytest.raises(ValueError, match=r"checkpoint s3://b/run/step-00000002: rng/rank1"):
        integrity.check_local(d, "s3://b/run/step-00000002")


def _fs_path(uri: str):
    from pipeline.checkpoint import filesystem_for

    fs, path, _ = filesystem_for(uri)
    return fs, path
