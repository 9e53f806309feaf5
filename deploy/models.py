"""What a replica serves: a model URI (`models:/name@alias`, `models:/name/N`, `runs:/…`, a local
bundle directory, or `synthetic:[delay]`) resolved to a generator factory and a description of
exactly which version is served."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.synthetic import SyntheticGenerator


@dataclass(frozen=True)
class ModelInfo:
    uri: str
    name: str
    version: str
    alias: str | None
    preset: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    info: ModelInfo
    new_generator: Callable[[], Any]  # -> object with .stream(prompt, seconds, seed)


def load_model(uri: str, device: str | None = None) -> LoadedModel:
    """Load `models:/name@alias`, a local bundle dir or `synthetic:` into a generator factory."""
    if uri.startswith("synthetic:"):
        delay = float(uri.split(":", 1)[1] or 0.02)
        info = ModelInfo(uri, "synthetic", "0", None, "synthetic")
        return LoadedModel(info, lambda: SyntheticGenerator(delay=delay))
    bundle, info = _load_bundle(uri)
    StreamingGenerator = _model_api()
    # Place the weights once here (a GPU when the replica has one), not once per stream.
    bundle.to(_pick_device(device))
    return LoadedModel(info, lambda: StreamingGenerator(bundle))


def _pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_api() -> Any:
    """StreamingGenerator, imported late: torch is needed only for a real model."""
    try:
        from model import StreamingGenerator
    except ImportError:  # model/__init__ not exporting it yet: use the defining module
        from model.streaming import StreamingGenerator
    return StreamingGenerator


def _load_bundle(uri: str) -> tuple[Any, ModelInfo]:
    """Bundle + what it is. An alias is resolved to a version first and that version is loaded,
    so the reported version is the one served even if the alias moves meanwhile."""
    from pipeline.registry import load_bundle

    if uri.startswith("models:/"):
        name, _, alias = uri[len("models:/") :].partition("@")
        name, _, version = name.partition("/")
        if not name or not (alias or version):
            raise ValueError(f"--model {uri!r}: expected models:/<name>@<alias> or /<version>")
        if alias:
            version = _registry_version(name, alias)
        bundle = load_bundle(f"models:/{name}/{version}")
        return bundle, ModelInfo(uri, name, version, alias or None, _preset(bundle))
    if "://" in uri or ":/" in uri:  # runs:/…, s3://… : whatever the registry loader takes
        bundle = load_bundle(uri)
        return bundle, ModelInfo(uri, uri, "unversioned", None, _preset(bundle))
    path = Path(uri)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {uri!r}: not a bundle directory or a models:/ URI")
    bundle = load_bundle(str(path))
    return bundle, ModelInfo(uri, path.name, _dir_version(path), None, _preset(bundle))


def _dir_version(path: Path) -> str:
    # A local bundle has no registry version: use a content hash of its small files.
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*.json")):
        digest.update(f.read_bytes())
    return "sha256:" + digest.hexdigest()[:12]


def _registry_version(name: str, alias: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def _preset(bundle: Any) -> str | None:
    return getattr(getattr(bundle, "config", None), "name", None)  # ModelConfig.name: the preset
