"""A `Bundle` is everything generation needs: the DiT, both codecs and the text encoder.

On disk (`save_pretrained`): `config.json` (model config, text-encoder config, codec classes and
configs), `model.safetensors`, `text.safetensors`, `codecs.safetensors` and `manifest.json` with
the sha256 of each file. Written into a temporary sibling folder and renamed into place, so a
crash never leaves a half-written bundle. Loading verifies the checksums and refuses a
config/weights mismatch, naming the keys. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .dit import AVDiT
from .text import WordTextEncoder

FORMAT = "omniforcing-bundle"
VERSION = 1
FILES = ("config.json", "model.safetensors", "text.safetensors", "codecs.safetensors")


class BundleError(ValueError):
    """A bundle on disk that cannot be loaded as it is (names the file or keys)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_state_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False
) -> None:
    """load_state_dict with a clear error listing missing / unexpected / mis-shaped keys.
    `assign`: the module's tensors become `state`'s (a meta-device module gets real weights)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or shapes:
        raise BundleError(
            f"{what}: weights do not match the config — missing {missing[:8]}"
            f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'…' if len(unexpected) > 8 else ''}, shape mismatches {shapes[:8]}"
        )
    module.load_state_dict(state, assign=assign)


def load_dit(cfg: ModelConfig, path: Path, device=None, dtype=None) -> AVDiT:
    """An AVDiT with the weights of `path`, built on the meta device (shapes only: no random
    init, no memory) and filled tensor by tensor from the mmapped safetensors file, each cast
    to `dtype` (floating tensors; None keeps the file's) on `device` (None: CPU). Peak host
    memory is one tensor, not the model: an ltx2 DiT in fp32 is ~76 GB."""
    with torch.device("meta"):
        model = AVDiT(cfg)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    state = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in f.keys():  # safe_open is not a mapping
            t = f.get_tensor(key)
            state[key] = t.to(dev, dtype if t.is_floating_point() else None)
    load_state_strict(model, state, str(path), assign=True)
    return model


@dataclass
class Bundle:
    model: AVDiT
    video_codec: Any
    audio_codec: Any
    text_encoder: WordTextEncoder

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def to(self, device=None, dtype=None) -> Bundle:
        self.model.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        return self

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Atomically write the bundle to `directory` (replacing an existing one)."""
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            codec_state = {f"video.{k}": v for k, v in self.video_codec.state().items()}
            codec_state |= {f"audio.{k}": v for k, v in self.audio_codec.state().items()}
            config = {
                "format": FORMAT,
                "version": VERSION,
                "model": self.model.cfg.to_dict(),
                "text_encoder": self.text_encoder.config(),
                "codecs": {
                    "video": {
                        "class": type(self.video_codec).__name__,
                        "config": self.video_codec.config(),
                    },
                    "audio": {
                        "class": type(self.audio_codec).__name__,
                        "config": self.audio_codec.config(),
                    },
                },
                "extra": extra or {},
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(_contiguous(self.model.state_dict()), tmp / "model.safetensors")
            save_file(_contiguous(self.text_encoder.state_dict()), tmp / "text.safetensors")
            save_file(_contiguous(codec_state), tmp / "codecs.safetensors")
            manifest = {name: sha256_file(tmp / name) for name in FILES}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device=None, verify: bool = True, dtype=None
    ) -> Bundle:
        """Load a saved bundle. With `device` or `dtype` the DiT is read straight onto `device`
        in `dtype` (`load_dit`: never a full fp32 copy in host memory) and the text encoder is
        moved to `device` (fp32); codecs stay on the CPU. Without them: all fp32 on the CPU."""
        d = Path(directory)
        config = read_config(d, verify)
        mcfg = ModelConfig.from_dict(config["model"])
        if device is None and dtype is None:
            model = AVDiT(mcfg)
            load_state_strict(model, load_file(d / "model.safetensors"), f"{d}/model.safetensors")
        else:
            model = load_dit(mcfg, d / "model.safetensors", device, dtype)
        text = WordTextEncoder.from_config(config["text_encoder"])
        load_state_strict(text, load_file(d / "text.safetensors"), f"{d}/text.safetensors")
        codec_state = load_file(d / "codecs.safetensors")
        codecs = []
        for kind in ("video", "audio"):
            entry = config["codecs"][kind]
            state = {
                k[len(kind) + 1 :]: v for k, v in codec_state.items() if k.startswith(kind + ".")
            }
            codecs.append(codec_class(entry["class"]).from_state(entry["config"], state))
        bundle = cls(model.eval(), codecs[0], codecs[1], text.eval())
        return bundle.to(device) if device is not None else bundle


def read_config(directory: Path, verify: bool = True) -> dict[str, Any]:
    """Read and check a bundle's config.json (and its manifest checksums when `verify`)."""
    if not (directory / "config.json").is_file():
        raise BundleError(f"{directory}: not a bundle (no config.json)")
    if verify:
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{directory}: manifest.json missing; refusing an unverified bundle")
        manifest = json.loads(manifest_path.read_text())
        for name in FILES:
            if not (directory / name).is_file():
                raise BundleError(f"{directory}: {name} missing")
            if sha256_file(directory / name) != manifest.get(name):
                raise BundleError(
                    f"{directory}/{name}: checksum does not match manifest.json "
                    "(file modified or corrupted)"
                )
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise BundleError(
            f"{directory}: format {config.get('format')!r} v{config.get('version')} is not "
            f"{FORMAT!r} v{VERSION}"
        )
    return config


def codec_class(name: str):
    """Resolve a codec class by name from model.codecs (the only place codecs live)."""
    from .codecs import _CODECS  # the one type-name → class table of the codecs

    cls = _CODECS.get(name)
    if cls is None:
        raise BundleError(f"unknown codec class {name!r} (not in model.codecs)")
    return cls
