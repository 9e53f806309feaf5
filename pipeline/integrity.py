"""Checkpoint integrity: per-rank manifests, verification in storage, the newest complete one.

Every rank lists the files it wrote into a checkpoint (size and sha256) in
`manifest/rank<r>.json`, written last in its own folder; rank 0's meta.json records the world
size. Ray Train uploads a checkpoint's files in no set order, so a job killed mid-upload (SIGKILL,
a lost node) can leave any subset of them in storage. A checkpoint is complete when meta.json,
the manifest of every rank and every file those list are there with the recorded size and
sha256; anything else is never loaded. `newest_complete` picks the checkpoint to resume from
(newest first among the run folder's `step-*`, each one skipped logs one line naming it and
why); `problem` says what is wrong with one. Works on a local folder or s3:// alike (pyarrow
filesystems from `pipeline.checkpoint`). No Ray, no MLflow, no DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MANIFEST_DIR = "manifest"
META = "meta.json"
STEP_DIR = re.compile(r"^step-\d{8}$")
log = logging.getLogger("omniforcing.checkpoint")


def write_manifest(d: Path, rank: int) -> Path:
    """`manifest/rank<rank>.json`: size and sha256 of every file this rank wrote under `d`."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and not rel.startswith(MANIFEST_DIR + "/"):
            with p.open("rb") as f:
                files[rel] = {"size": p.stat().st_size, "sha256": _sha256(f)}
    out = d / MANIFEST_DIR / f"rank{rank}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, out)
    return out


def _sha256(f: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def problem(fs: pafs.FileSystem, path: str) -> str | None:
    """None when the checkpoint folder `path` on `fs` is complete and intact, else what is
    wrong with it (the first thing found): a missing meta.json or manifest (a write that never
    finished), a listed file missing, or a file whose size or sha256 differs from its manifest."""
    path = path.rstrip("/")
    meta = _read_json(fs, f"{path}/{META}")
    if meta is None:
        return f"no {META} (incomplete write)"
    if not isinstance(meta.get("world"), int):
        return f"{META} has no world size (written before checkpoint manifests)"
    expected: dict[str, list[dict[str, Any]]] = {}
    for rank in range(meta["world"]):
        manifest = _read_json(fs, f"{path}/{MANIFEST_DIR}/rank{rank}.json")
        if manifest is None:
            return f"{MANIFEST_DIR}/rank{rank}.json missing (incomplete write)"
        for rel, rec in manifest["files"].items():
            expected.setdefault(rel, []).append(rec)
    found = {
        info.path[len(path) + 1 :]: info
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if info.type == pafs.FileType.File
    }
    for rel, recs in sorted(expected.items()):
        info = found.get(rel)
        if info is None:
            return f"{rel} missing (incomplete write)"
        if info.size not in {r["size"] for r in recs}:
            return f"{rel}: {info.size} bytes, its manifest says {recs[0]['size']} (truncated)"
        with fs.open_input_stream(f"{path}/{rel}") as f:
            digest = _sha256(f)
        if digest not in {r["sha256"] for r in recs}:
            return f"{rel}: sha256 does not match its manifest (corrupted)"
    return None


def _forget_listings(fs: pafs.FileSystem) -> None:
    """Drop s3fs's cached listings (sizes, ETags) behind a wrapped fsspec filesystem: files of a
    checkpoint may have been rewritten since this process listed them, and s3fs refuses to read
    a file whose ETag moved (FileExpired) instead of reading what is there now."""
    inner = getattr(getattr(fs, "handler", None), "fs", None)
    if inner is not None and hasattr(inner, "invalidate_cache"):
        inner.invalidate_cache()


def check_local(d: Path, name: str) -> None:
    """Raise ValueError naming `name` (the checkpoint's URI) unless the local copy `d` is
    complete and intact."""
    why = problem(pafs.LocalFileSystem(), str(Path(d).resolve()))
    if why is not None:
        raise ValueError(f"checkpoint {name}: {why}; refusing to load it")


def newest_complete(uri: str, endpoint: str | None = None, region: str = "us-east-1") -> str:
    """The URI of the newest complete checkpoint in the run folder of checkpoint `uri` (the
    one MLflow names; newer folders there are tried too: a write torn by a kill leaves one),
    or in the run folder `uri` itself.
    Each checkpoint passed over is logged as one warning naming it; none complete: ValueError."""
    from pipeline.checkpoint import filesystem_for

    fs, path, uri_prefix = filesystem_for(uri, endpoint, region)
    _forget_listings(fs)
    parent, _, name = path.rstrip("/").rpartition("/")
    if not STEP_DIR.match(name):  # a launch's run folder, not a checkpoint in it
        parent, name = path.rstrip("/"), ""
    names = {name} - {""}
    if fs.get_file_info(parent).type == pafs.FileType.Directory:
        names |= {
            info.base_name
            for info in fs.get_file_info(pafs.FileSelector(parent))
            if info.type == pafs.FileType.Directory and STEP_DIR.match(info.base_name)
        }
    skipped = []
    for candidate in sorted(names, reverse=True):
        full = f"{parent}/{candidate}"
        why = problem(fs, full)
        if why is None:
            return uri_prefix + full
        log.warning("checkpoint %s%s skipped: %s", uri_prefix, full, why)
        skipped.append(f"{candidate} ({why})")
    raise ValueError(
        f"--resume: no complete checkpoint for {uri} in {uri_prefix}{parent}: " + "; ".join(skipped)
    )
