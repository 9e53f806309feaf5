"""Read a diffusers LTX-2.0 transformer (local folder or s3://) into our AVDiT or a DiT bundle.

The source is a diffusers transformer folder (config.json + diffusion_pytorch_model*.safetensors,
sharded with an index or not) or a whole pipeline folder with one in `transformer/`. Before any
weight is read, every shard's safetensors header (a few kB, a ranged read on S3) is checked
against our model: missing, unexpected and mis-shaped keys are named, in diffusers' names, in one
line. Then shards are read one at a time (an S3 shard is copied to a temporary file first and
deleted after), one tensor at a time, each cast straight to the target dtype and device: no full
host copy of the model, no fp32 detour.

From a whole pipeline folder (transformer/ plus vae/, audio_vae/, vocoder/, text_encoder/,
tokenizer/, connectors/) the import writes a full teacher bundle: the DiT streamed as above, LTX-2's
codecs and Gemma-3 text encoder (pipeline/ltx2/components.py) beside it, one sha256 manifest over
all of it. From a transformer alone it writes a DiT-only bundle (model.dit_bundle) that says what
it lacks, and `Bundle.from_pretrained` refuses that one in one line saying how to import the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from data.shards import resolve
from model.bundle import load_state_strict, sha256_file
from model.config import ModelConfig
from model.dit import AVDiT
from model.dit_bundle import Entry, write_dit_bundle, write_streamed_bundle
from pipeline.ltx2.config import model_config_from_diffusers
from pipeline.ltx2.keymap import key_map

MISSING = (
    "LTX-2's video/audio VAEs, vocoder and Gemma-3 text encoder + connectors are not imported "
    "yet: this bundle holds the transformer only; import a whole LTX2Pipeline folder for them"
)
_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SINGLE = "diffusion_pytorch_model.safetensors"
_FLOATS = ("F64", "F32", "F16", "BF16")  # cast to the bundle's dtype
_INTS = {"I64": torch.int64, "I32": torch.int32}  # kept as they are


@dataclass
class Source:
    """A diffusers LTX-2 transformer folder: where it is, its config and its weight shards."""

    path: str  # as given (for messages and the bundle's record)
    fs: Any  # fsspec filesystem
    root: str  # the transformer folder on `fs`
    config: dict[str, Any]
    shards: list[str]  # file names inside `root`


def open_source(path: str) -> Source:
    """The transformer folder at `path` (or at `path`/transformer), its config and shard list."""
    fs, root = resolve(path)
    if not fs.exists(f"{root}/config.json") and fs.exists(f"{root}/transformer/config.json"):
        root = f"{root}/transformer"
    if not fs.exists(f"{root}/config.json"):
        raise FileNotFoundError(f"{path}: no config.json (nor transformer/config.json)")
    config = json.loads(fs.cat(f"{root}/config.json"))
    cls = config.get("_class_name", "LTX2VideoTransformer3DModel")
    if cls != "LTX2VideoTransformer3DModel":
        raise ValueError(f"{path}: config.json is a {cls}, not an LTX2VideoTransformer3DModel")
    if fs.exists(f"{root}/{_INDEX}"):
        shards = sorted(set(json.loads(fs.cat(f"{root}/{_INDEX}"))["weight_map"].values()))
    elif fs.exists(f"{root}/{_SINGLE}"):
        shards = [_SINGLE]
    else:
        raise FileNotFoundError(f"{path}: no {_SINGLE} (nor its .index.json)")
    return Source(path, fs, root, config, shards)


def _header(fs: Any, path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} from a safetensors file's header, without reading its tensors."""
    with fs.open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


Layout = list[tuple[str, list[tuple[str, str, str, tuple[int, ...]]]]]
"""[(shard, [(diffusers key, our key, safetensors dtype, shape), …]), …] in file order."""


def plan(source: Source, cfg: ModelConfig) -> Layout:
    """Where each of our weights is in the source, after checking every key and shape against
    `cfg`'s model; a one-line ValueError names what does not match (diffusers' names)."""
    with torch.device("meta"):
        want = {k: tuple(t.shape) for k, t in AVDiT(cfg).state_dict().items()}
    names = key_map(list(want))  # diffusers key → ours
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    out: Layout = []
    for shard in source.shards:
        header = _header(source.fs, f"{source.root}/{shard}")
        found |= header
        keys = [k for k in sorted(header) if k in names]
        out.append((shard, [(k, names[k], *header[k]) for k in keys]))
    missing = sorted(set(names) - set(found))
    unexpected = sorted(set(found) - set(names))
    shapes = [
        f"{k} {found[k][1]} expected {want[names[k]]}"
        for k in sorted(set(found) & set(names))
        if found[k][1] != want[names[k]]
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source.path}: weights do not fit {cfg.name} (arch ltx2): missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}, wrong shape {_few(shapes)}"
        )
    return out


def _few(items: list[str], n: int = 6) -> str:
    """A list's repr, cut to n items. (Quoted items: rich, which prints CLI errors, would read
    a bare [name] as a markup tag and drop it.)"""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return repr(items[:n]) + more


@contextlib.contextmanager
def _local(source: Source, shard: str) -> Iterator[Path]:
    """A local path of `shard`: the file itself, or a temporary copy of an S3 object."""
    remote = f"{source.root}/{shard}"
    if source.path.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="ltx2-shard-") as tmp:
            local = Path(tmp) / Path(shard).name
            source.fs.get(remote, str(local))
            yield local
    else:
        yield Path(remote)


def tensors(
    source: Source,
    layout: Layout,
    dtype: torch.dtype | None,
    device: torch.device | str | None = None,
    hashes: dict[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, tensor) shard by shard, tensor by tensor, floating ones cast to `dtype` on
    `device`. `hashes` (when given) receives each shard's sha256 as it is read."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for shard, pairs in layout:
        with _local(source, shard) as local:
            if hashes is not None:
                hashes[shard] = sha256_file(local)
            with safe_open(local, framework="pt", device="cpu") as f:
                for theirs, ours, _, _ in pairs:
                    t = f.get_tensor(theirs)
                    yield ours, t.to(dev, dtype if t.is_floating_point() else None)


def load_ltx2(
    path: str,
    latent_hw: tuple[int, int] = (16, 24),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> AVDiT:
    """Our bidirectional AVDiT (arch ltx2) with the weights of a diffusers LTX-2 folder, built on
    the meta device and filled tensor by tensor on `device` in `dtype` (None: as stored)."""
    source = open_source(path)
    cfg = model_config_from_diffusers(source.config, latent_hw=latent_hw)
    layout = plan(source, cfg)
    with torch.device("meta"):
        model = AVDiT(cfg)
    state = dict(tensors(source, layout, dtype, device))
    load_state_strict(model, state, path, assign=True)
    return model.eval()


def import_ltx2(
    path: str,
    out: str | os.PathLike,
    latent_hw: tuple[int, int] = (16, 24),
    dtype: torch.dtype = torch.bfloat16,
    name: str = "ltx2",
    max_len: int = 1024,
    lookahead: tuple[int, int] = (0, 2),
) -> Path:
    """Import a diffusers LTX-2 folder. A pipeline folder with every part (pipeline.ltx2.components
    .PARTS) becomes a full teacher bundle (model.bundle format: DiT, LTX-2's codecs and text
    encoder); a transformer alone, or a folder missing parts, a DiT-only bundle whose record says
    what it lacks (MISSING). Weights in `dtype`; the source's path, config and files' sha256s are
    recorded either way. `max_len`: prompt tokens of the text encoder (LTX-2: 1024).
    `lookahead`: (video, audio) latents each codec's streaming decode holds back for the
    decoder's look-ahead (pipeline.ltx2.codecs; audio 2 = 80 ms makes chunked audio exact)."""
    from pipeline.ltx2.components import load_parts, local_pipeline, missing_parts

    source = open_source(path)
    cfg = model_config_from_diffusers(source.config, latent_hw=latent_hw, name=name)
    layout = plan(source, cfg)
    entries: list[Entry] = [
        (ours, dtype if code in _FLOATS else _INTS[code], shape)
        for _, pairs in layout
        for _, ours, code, shape in pairs
    ]
    hashes: dict[str, str] = {}
    lacks = missing_parts(path)
    record = {
        "from": "diffusers",
        "class": "LTX2VideoTransformer3DModel",
        "path": path,
        "config": source.config,
        "config_sha256": hashlib.sha256(source.fs.cat(f"{source.root}/config.json")).hexdigest(),
        "files": hashes,  # sha256 per shard, filled as each is read (config.json is written last)
        "key_map": "pipeline/ltx2/keymap.py (diffusers name -> ours)",
    }
    stream = tensors(source, layout, dtype, None, hashes)
    if lacks:
        record["missing"] = f"{MISSING} (the source has no {', '.join(lacks)})"
        return write_dit_bundle(out, cfg, entries, stream, record)
    with local_pipeline(path) as root:
        parts = load_parts(root, latent_hw, dtype, max_len, lookahead)
    record["parts"] = (
        "vae, audio_vae, vocoder, text_encoder (Gemma 3 language model), tokenizer, connectors"
    )
    return write_streamed_bundle(out, cfg, entries, stream, parts, {"source": record})
