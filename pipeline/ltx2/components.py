"""LTX-2's non-transformer parts from a diffusers `LTX2Pipeline` folder → our codecs + text encoder.

A pipeline folder (Lightricks/LTX-2 in diffusers layout) holds `transformer/`, `vae/`,
`audio_vae/`, `vocoder/`, `text_encoder/` (Gemma 3), `tokenizer/` and `connectors/`. Each part is
read by its own library's `from_pretrained` (diffusers for the VAEs, vocoder and connectors,
transformers for Gemma 3 and the tokenizer), so key renames and sharding are theirs to handle;
an s3:// folder is copied to a temporary folder part by part first. The importer
(pipeline/ltx2/importer.py) turns the result into a full teacher bundle.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data.shards import resolve

PARTS = ("vae", "audio_vae", "vocoder", "text_encoder", "tokenizer", "connectors")


def missing_parts(path: str) -> list[str]:
    """The parts of PARTS that the pipeline folder at `path` (local or s3://) lacks."""
    fs, root = resolve(path)
    if fs.exists(f"{root}/config.json") and not fs.exists(f"{root}/transformer"):
        return list(PARTS)  # a bare transformer folder
    out = []
    for part in PARTS:
        marker = "tokenizer_config.json" if part == "tokenizer" else "config.json"
        if not fs.exists(f"{root}/{part}/{marker}"):
            out.append(part)
    return out


@contextlib.contextmanager
def local_pipeline(path: str) -> Iterator[Path]:
    """A local folder with the pipeline's parts: `path` itself, or a temporary copy of the
    PARTS of an s3:// folder (the transformer is streamed by the importer, not copied)."""
    if not path.startswith("s3://"):
        yield Path(path)
        return
    fs, root = resolve(path)
    with tempfile.TemporaryDirectory(prefix="ltx2-parts-") as tmp:
        for part in PARTS:
            fs.get(f"{root}/{part}", f"{tmp}/{part}", recursive=True)
        yield Path(tmp)


def load_parts(
    root: Path,
    latent_hw: tuple[int, int],
    dtype: torch.dtype,
    max_len: int = 1024,
    lookahead: tuple[int, int] = (0, 2),
) -> tuple[Any, Any, Any]:
    """(LTX2VideoCodec, LTX2AudioCodec, LTX2TextEncoder) from a local pipeline folder, weights
    in `dtype`. `max_len`: prompt tokens (LTX-2's pipeline pads every prompt to 1024).
    `lookahead`: (video, audio) latents the codecs hold back while streaming."""
    import transformers
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2 import vocoder as vocoders
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    from pipeline.ltx2.audio import _VOCODERS, LTX2AudioCodec
    from pipeline.ltx2.codecs import LTX2VideoCodec
    from pipeline.ltx2.text import LTX2TextEncoder, language_model, pack_files

    vae = AutoencoderKLLTX2Video.from_pretrained(root / "vae", torch_dtype=dtype)
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(root / "audio_vae", torch_dtype=dtype)
    voc_name = _class_name(root / "vocoder", "_class_name", _VOCODERS)
    voc = getattr(vocoders, voc_name).from_pretrained(root / "vocoder", torch_dtype=dtype)
    arch = _class_name(root / "text_encoder", "architectures", None)
    gemma = getattr(transformers, arch).from_pretrained(root / "text_encoder", dtype=dtype)
    connectors = LTX2TextConnectors.from_pretrained(root / "connectors", torch_dtype=dtype)
    text = LTX2TextEncoder(
        language_model(gemma), connectors, pack_files(root / "tokenizer"), max_len
    )
    video = LTX2VideoCodec(vae, latent_hw, lookahead_latents=lookahead[0])
    return video, LTX2AudioCodec(audio_vae, voc, lookahead_latents=lookahead[1]), text


def _class_name(folder: Path, key: str, allowed: tuple[str, ...] | None) -> str:
    """The class a part's config.json names (`architectures[0]` for transformers), checked:
    diffusers' LTX-2 vocoders, or a Gemma 3 model of transformers."""
    value = json.loads((folder / "config.json").read_text()).get(key)
    name = value[0] if isinstance(value, list) and value else value
    ok = name in allowed if allowed else isinstance(name, str) and name.startswith("Gemma3")
    if not ok:
        want = allowed or "a Gemma3* model"
        raise ValueError(f"{folder}/config.json: {key} {value!r} is not {want}")
    return name
