"""A DiT-only bundle (an imported transformer without codecs or a text encoder), and streamed
full bundles (`write_streamed_bundle`: an imported teacher with all its parts).

On disk: `config.json` (`"format": "omniforcing-dit"`, the model config, a `"source"` entry that
says where the weights came from, their files' sha256s and what the bundle lacks),
`model.safetensors` and `manifest.json` (sha256 of both). A full `model.bundle.Bundle` needs
codecs and a text encoder; rather than invent them this format says it holds only the DiT, and
`load_dit_bundle` is its one reader.

`write_dit_bundle` streams the weights: the safetensors header is written from the declared
(name, dtype, shape) list and each tensor is appended as it arrives, so an importer holds one
tensor at a time (an LTX-2 DiT is 38 GB in bf16). Written into a temporary sibling folder and
renamed into place, as bundles are.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .bundle import (
    FILES,
    BundleError,
    _contiguous,
    bundle_config,
    codec_tensors,
    load_dit,
    replace_folder,
    sha256_file,
)
from .config import ModelConfig
from .dit import AVDiT

DIT_FORMAT = "omniforcing-dit"
DIT_VERSION = 1
DIT_FILES = ("config.json", "model.safetensors")
_ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}

Entry = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape) of one tensor


def write_dit_bundle(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    entries: list[Entry],
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: dict[str, Any],
) -> Path:
    """Write a DiT-only bundle. `tensors` yields (name, tensor) in the order of `entries`, each
    with the declared dtype and shape (checked); `source` is recorded in config.json, which is
    written after the weights."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = {
            "format": DIT_FORMAT,
            "version": DIT_VERSION,
            "model": cfg.to_dict(),
            "source": source,
        }
        # Weights first: `source` may be completed while they stream (the source files' hashes).
        _stream_safetensors(tmp / "model.safetensors", entries, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        manifest = {name: sha256_file(tmp / name) for name in DIT_FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_streamed_bundle(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    entries: list[Entry],
    tensors: Iterable[tuple[str, torch.Tensor]],
    parts: tuple[Any, Any, Any],
    extra: dict[str, Any],
    sampler: dict[str, Any] | None = None,
) -> Path:
    """Write a full `model.bundle.Bundle` (the format `Bundle.save_pretrained` writes) whose DiT
    weights are streamed as in `write_dit_bundle`; `parts` = (video codec, audio codec, text
    encoder), saved as `save_pretrained` saves them; `sampler`: its "sampler" entry
    (`model.bundle.sampler_config`). For an imported teacher, or an exported student, too large
    to hold twice in host memory (LTX-2: 38 GB of DiT in bf16)."""
    from safetensors.torch import save_file

    video, audio, text = parts
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _stream_safetensors(tmp / "model.safetensors", entries, tensors)
        save_file(_contiguous(text.state_dict()), tmp / "text.safetensors")
        save_file(_contiguous(codec_tensors(video, audio)), tmp / "codecs.safetensors")
        config = bundle_config(cfg, text, video, audio, extra) | (sampler or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        manifest = {name: sha256_file(tmp / name) for name in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _stream_safetensors(
    path: Path, entries: list[Entry], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """A safetensors file written tensor by tensor: 8-byte header length, JSON header (padded to
    8 bytes), then the tensors' raw little-endian bytes back to back in `entries` order."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape)}
        header[name]["data_offsets"] = [offset, offset + size]
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    count = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, t), (want, dtype, shape) in zip(tensors, entries, strict=True):
            if name != want or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise BundleError(
                    f"{path}: tensor {name} {t.dtype} {tuple(t.shape)} arrived where "
                    f"{want} {dtype} {tuple(shape)} was declared"
                )
            t = t.detach().cpu().contiguous()
            f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
            count += 1
    if count != len(entries):
        raise BundleError(f"{path}: {count} of {len(entries)} declared tensors arrived")


def read_dit_config(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """config.json of a DiT-only bundle, its files checked against manifest.json."""
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise BundleError(f"{d}: not a DiT bundle (no config.json)")
    if verify:
        if not (d / "manifest.json").is_file():
            raise BundleError(f"{d}: manifest.json missing; refusing an unverified bundle")
        manifest = json.loads((d / "manifest.json").read_text())
        for name in DIT_FILES:
            if not (d / name).is_file() or sha256_file(d / name) != manifest.get(name):
                raise BundleError(f"{d}/{name}: missing or checksum does not match manifest.json")
    config = json.loads((d / "config.json").read_text())
    if config.get("format") != DIT_FORMAT or config.get("version") != DIT_VERSION:
        raise BundleError(
            f"{d}: format {config.get('format')!r} v{config.get('version')} is not "
            f"{DIT_FORMAT!r} v{DIT_VERSION}"
        )
    return config


def load_dit_bundle(
    directory: str | os.PathLike, device=None, dtype=torch.float32, verify: bool = True
) -> AVDiT:
    """The DiT of a DiT-only bundle, built on the meta device and filled tensor by tensor on
    `device` (None: CPU) in `dtype` (None: as stored) — never a full fp32 host copy."""
    config = read_dit_config(directory, verify)
    cfg = ModelConfig.from_dict(config["model"])
    return load_dit(cfg, Path(directory) / "model.safetensors", device, dtype).eval()
