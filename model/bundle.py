"""A `Bundle` is everything generation needs: the DiT, both codecs and the text encoder.

On disk (`save_pretrained`): `config.json` (model config, text-encoder config, codec classes and
configs), `model.safetensors`, `text.safetensors`, `codecs.safetensors` and `manifest.json` with
the sha256 of each file; a teacher that samples with autoguidance (`model.guidance.Guide`) adds
`guide.safetensors` + `guide_text.safetensors` and a "guide" entry (its model and text-encoder
configs, its weight) in config.json; one that samples on a staggered schedule says so in a
"sampler" entry (`stagger`: Δ of `flow.staggered_sigmas`). DiT weights may be stored in a
narrower float dtype (`weights_dtype`: the shipped demo teacher is fp16 on disk) and load as
fp32 (or in the `dtype` asked for). Written into a temporary sibling folder and renamed into
place, so a crash never leaves a half-written bundle. Loading verifies the checksums and refuses
a config/weights mismatch, naming the keys. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import flow
from .config import ModelConfig
from .dit import AVDiT
from .guidance import Guide
from .text import WordTextEncoder

FORMAT = "omniforcing-bundle"
VERSION = 1
FILES = ("config.json", "model.safetensors", "text.safetensors", "codecs.safetensors")
CODEC_FILES = ("config.json", "codecs.safetensors")  # what `read_codecs` reads
GUIDE_FILES = ("guide.safetensors", "guide_text.safetensors")  # only with a "guide" entry
CONFIG_KEYS = {"format", "version", "model", "text_encoder", "codecs", "extra", "sampler", "guide"}


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`, replacing an existing one."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class BundleError(ValueError):
    """A bundle on disk that cannot be loaded as it is (names the file or keys)."""


# Codec and text-encoder classes that live outside model/ (model/ imports only torch), by the
# class name a bundle's config.json records. Registered with a zero-argument loader so that
# registering costs nothing: `pipeline` registers LTX-2's (diffusers-backed) classes on import.
_EXTERNAL: dict[str, dict[str, tuple[Callable[[], type], str]]] = {"codec": {}, "text": {}}


def register_codec(name: str, load: Callable[[], type], where: str) -> None:
    """Make codec class `name` loadable from bundles: `load()` returns the class (with
    `from_state(config, tensors)`); `where` says what provides it, for error messages."""
    _EXTERNAL["codec"][name] = (load, where)


def register_text_encoder(name: str, load: Callable[[], type], where: str) -> None:
    """Make text-encoder class `name` (a config.json "class") loadable: `load()` returns an
    nn.Module class with `from_state(config, tensors)` and a `config()` that records "class"."""
    _EXTERNAL["text"][name] = (load, where)


def _external(kind: str, name: str) -> type:
    entry = _EXTERNAL[kind].get(name)
    if entry is None:
        hint = "" if _EXTERNAL[kind] else " (none registered: `import pipeline` registers LTX-2's)"
        raise BundleError(
            f"unknown {'codec' if kind == 'codec' else 'text encoder'} class {name!r}: not in "
            f"model and not registered{hint}"
        )
    return entry[0]()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """CPU contiguous copies; floating tensors cast to `dtype` when given."""
    return {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else None).contiguous()
        for k, v in state.items()
    }


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
    _require(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # safe_open is not a mapping
                t = f.get_tensor(key)
                state[key] = t.to(dev, dtype if t.is_floating_point() else None)
    except Exception as err:  # noqa: BLE001 — SafetensorError, OSError: named, one line
        raise _unreadable(path, err) from None
    load_state_strict(model, state, str(path), assign=True)
    return model


def bundle_config(
    cfg: ModelConfig, text_encoder: Any, video_codec: Any, audio_codec: Any, extra: dict | None
) -> dict[str, Any]:
    """config.json of a bundle (without "sampler"/"guide", which only `save_pretrained` adds)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": cfg.to_dict(),
        "text_encoder": text_encoder.config(),
        "codecs": {
            kind: {"class": type(codec).__name__, "config": codec.config()}
            for kind, codec in (("video", video_codec), ("audio", audio_codec))
        },
        "extra": extra or {},
    }


def codec_tensors(video_codec: Any, audio_codec: Any) -> dict[str, torch.Tensor]:
    """codecs.safetensors' tensors: each codec's state under "video." / "audio."."""
    out = {f"video.{k}": v for k, v in video_codec.state().items()}
    return out | {f"audio.{k}": v for k, v in audio_codec.state().items()}


@dataclass
class Bundle:
    model: AVDiT
    video_codec: Any
    audio_codec: Any
    text_encoder: Any  # model.text.TextEncoder: WordTextEncoder, or a registered class
    guide: Guide | None = None  # autoguidance for the teacher's samplers (model.guidance)
    stagger: float = 0.0  # the teacher sampler's Δ (flow.staggered_sigmas); 0: joint schedule
    # A causal student's few-step σ list (distill.student_sigmas it was distilled for); None:
    # flow.DEFAULT_STUDENT_SIGMAS. StreamingGenerator samples with it.
    sigmas: tuple[float, ...] | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    def to(self, device=None, dtype=None) -> Bundle:
        self.model.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        for codec in (self.video_codec, self.audio_codec):
            if hasattr(codec, "to"):  # learned codecs (LTX-2's VAEs); ours are fixed tables
                codec.to(device)
        if self.guide is not None:
            self.guide.to(device, dtype)
        return self

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        extra: dict | None = None,
        weights_dtype: torch.dtype | None = None,
    ) -> Path:
        """Atomically write the bundle to `directory` (replacing an existing one). DiT weights
        (teacher and guide) are stored in `weights_dtype` when given (floating tensors only)."""
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            codec_state = codec_tensors(self.video_codec, self.audio_codec)
            config = bundle_config(
                self.model.cfg, self.text_encoder, self.video_codec, self.audio_codec, extra
            )
            config |= sampler_config(self.stagger, self.sigmas)
            files = FILES
            if self.guide is not None:
                g = self.guide
                config["guide"] = {
                    "model": g.model.cfg.to_dict(),
                    "text_encoder": g.text_encoder.config(),
                    "weight": float(g.weight),
                }
                save_file(_contiguous(g.model.state_dict(), weights_dtype), tmp / GUIDE_FILES[0])
                save_file(_contiguous(g.text_encoder.state_dict()), tmp / GUIDE_FILES[1])
                files = FILES + GUIDE_FILES
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(
                _contiguous(self.model.state_dict(), weights_dtype), tmp / "model.safetensors"
            )
            save_file(_contiguous(self.text_encoder.state_dict()), tmp / "text.safetensors")
            save_file(_contiguous(codec_state), tmp / "codecs.safetensors")
            manifest = {name: sha256_file(tmp / name) for name in files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device=None, verify: bool = True, dtype=None
    ) -> Bundle:
        """Load a saved bundle. With `device` or `dtype` the DiT is read straight onto `device`
        in `dtype` (`load_dit`: never a full fp32 copy in host memory) and the text encoder is
        moved to `device` (fp32); codecs stay on the CPU. Without them: all fp32 on the CPU.
        A guide, when the bundle has one, loads the same way beside the DiT."""
        d = Path(directory)
        config = read_config(d, verify)
        model = _load_model(config["model"], d / "model.safetensors", device, dtype)
        text = _load_text(config["text_encoder"], d / "text.safetensors")
        codecs = _codecs(d, config)
        guide = None
        if "guide" in config:
            g = config["guide"]
            guide = Guide(  # frozen: a guide is only ever run, never trained
                _load_model(g["model"], d / GUIDE_FILES[0], device, dtype).eval(),
                _load_text(g["text_encoder"], d / GUIDE_FILES[1]).eval().requires_grad_(False),
                float(g["weight"]),
            )
            guide.model.requires_grad_(False)
        bundle = cls(
            model.eval(),
            codecs[0],
            codecs[1],
            text.eval(),
            guide,
            _stagger(config, d),
            _sigmas(config, d),
        )
        return bundle.to(device) if device is not None else bundle


def read_codecs(directory: str | os.PathLike, verify: bool = True) -> tuple[Any, Any]:
    """(video codec, audio codec) of a bundle alone: config.json and codecs.safetensors, both
    checked against the manifest when `verify`; the DiT and text encoder are not read (a data
    pipeline's encoder needs only these, and hashing an ltx2 DiT would take minutes)."""
    d = Path(directory)
    video, audio = _codecs(d, read_config(d, verify, files=CODEC_FILES))
    return video, audio


def _codecs(d: Path, config: dict[str, Any]) -> list[Any]:
    """Both codecs from config.json's "codecs" entry and codecs.safetensors."""
    codec_state = read_safetensors(d / "codecs.safetensors")
    codecs = []
    for kind in ("video", "audio"):
        entry = config["codecs"][kind]
        state = {k[len(kind) + 1 :]: v for k, v in codec_state.items() if k.startswith(kind + ".")}
        codecs.append(_from_config(d, f"codecs.{kind}", _codec, entry, state))
    return codecs


def _load_model(config: dict[str, Any], path: Path, device=None, dtype=None) -> AVDiT:
    """A DiT from its config entry and weight file: fp32 on the CPU (weights stored narrower
    are cast up) unless `device`/`dtype` are given (`load_dit`)."""
    mcfg = _from_config(path.parent, "model", ModelConfig.from_dict, config)
    if device is None and dtype is None:
        model = AVDiT(mcfg)
        load_state_strict(model, read_safetensors(path), str(path))
        return model
    return load_dit(mcfg, path, device, dtype)


def _load_text(config: dict[str, Any], path: Path) -> Any:
    """The text encoder of a config.json entry: our WordTextEncoder (no "class" key: every
    bundle before registered encoders existed), else the registered class's `from_state`."""
    if "class" in config:
        state = read_safetensors(path)
        name = config["class"]
        return _from_config(
            path.parent, "text_encoder", lambda: _external("text", name).from_state(config, state)
        )
    text = _from_config(path.parent, "text_encoder", WordTextEncoder.from_config, config)
    load_state_strict(text, read_safetensors(path), str(path))
    return text


def _from_config(directory: Path, where: str, build: Any, *args: Any) -> Any:
    """`build(*args)` of one config.json entry; a wrong or unknown key becomes a BundleError
    naming config.json and the entry (one line)."""
    try:
        return build(*args)
    except BundleError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        msg = _one_line(err)
        msg = msg if msg.startswith(where) else f"{where}: {msg}"
        raise BundleError(f"{directory}/config.json: {msg}") from None


def _codec(entry: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    return codec_class(entry["class"]).from_state(entry["config"], state)


def _require(path: Path) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: missing")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file. Anything else (missing, truncated, a pickled .pt
    under that name) is a BundleError naming the file: nothing is ever unpickled."""
    _require(path)
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 — SafetensorError, OSError: named, one line
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: BaseException) -> BundleError:
    return BundleError(
        f"{path}: not a readable safetensors file ({_one_line(err)}): truncated, or another "
        "format (pickled .pt/.bin files are never loaded)"
    )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def sampler_config(stagger: float, sigmas: Sequence[float] | None) -> dict[str, Any]:
    """The config.json "sampler" entry ({} when both are defaults)."""
    entry: dict[str, Any] = {}
    if stagger:
        entry["stagger"] = float(stagger)
    if sigmas is not None:
        entry["sigmas"] = [float(x) for x in sigmas]
    return {"sampler": entry} if entry else {}


def _sigmas(config: dict[str, Any], directory: Path) -> tuple[float, ...] | None:
    """The "sampler" entry's student σ list (None without one): decreasing numbers in (0, 1]."""
    value = config.get("sampler", {}).get("sigmas")
    if value is None:
        return None
    if not flow.student_sigmas_ok(value):
        raise BundleError(
            f"{directory}/config.json: sampler.sigmas must be decreasing numbers in (0, 1], "
            f"got {value!r}"
        )
    return tuple(float(x) for x in value)


def _stagger(config: dict[str, Any], directory: Path) -> float:
    """The "sampler" entry's Δ (0 without one); anything but a number ≥ 0 is named."""
    value = config.get("sampler", {}).get("stagger", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BundleError(
            f"{directory}/config.json: sampler.stagger must be a number ≥ 0, got {value!r}"
        )
    return float(value)


def read_config(
    directory: Path, verify: bool = True, files: tuple[str, ...] = FILES
) -> dict[str, Any]:
    """Read and check a bundle's config.json (and the manifest checksums of `files` and of a
    guide's files when `verify`)."""
    if not (directory / "config.json").is_file():
        raise BundleError(f"{directory}: not a bundle (no config.json)")
    _refuse_dit_only(directory)
    if verify:
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{directory}: manifest.json missing; refusing an unverified bundle")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise BundleError(f"{manifest_path}: not valid JSON ({err})") from None
        _verify(directory, manifest, files)
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError as err:
        raise BundleError(f"{directory}/config.json: not valid JSON ({err})") from None
    unknown = sorted(set(config) - CONFIG_KEYS) if isinstance(config, dict) else ["<not a map>"]
    if unknown:
        raise BundleError(
            f"{directory}/config.json: unknown key(s) {unknown}; known: {sorted(CONFIG_KEYS)}"
        )
    if verify and "guide" in config and files == FILES:  # config.json says if a guide ships
        _verify(directory, manifest, GUIDE_FILES)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise BundleError(
            f"{directory}: format {config.get('format')!r} v{config.get('version')} is not "
            f"{FORMAT!r} v{VERSION}"
        )
    return config


def _refuse_dit_only(directory: Path) -> None:
    """A DiT-only bundle (model.dit_bundle: `omniforcing import ltx2` from a transformer folder)
    has no codecs or text encoder: say so, and how to import the rest, in one line."""
    try:
        fmt = json.loads((directory / "config.json").read_text()).get("format")
    except (ValueError, AttributeError):
        return  # read_config names a malformed config.json itself
    if fmt == "omniforcing-dit":
        raise BundleError(
            f"{directory}: a DiT-only bundle (LTX-2's transformer alone): it lacks the video/audio "
            "VAEs, vocoder and Gemma-3 text encoder + connectors that generation needs; import "
            "all of them with `omniforcing import ltx2 --from <LTX2Pipeline folder with "
            "transformer/ vae/ audio_vae/ vocoder/ text_encoder/ tokenizer/ connectors/> --out "
            "<bundle>` (load this one with model.dit_bundle.load_dit_bundle)"
        )


def _verify(directory: Path, manifest: dict[str, str], names: tuple[str, ...]) -> None:
    for name in names:
        if not (directory / name).is_file():
            raise BundleError(f"{directory}: {name} missing")
        if sha256_file(directory / name) != manifest.get(name):
            raise BundleError(
                f"{directory}/{name}: checksum does not match manifest.json "
                "(file modified or corrupted)"
            )


def codec_class(name: str):
    """Resolve a codec class by name: model.codecs' own, else a registered one."""
    from .codecs import _CODECS  # the one type-name → class table of the codecs

    cls = _CODECS.get(name)
    return cls if cls is not None else _external("codec", name)
