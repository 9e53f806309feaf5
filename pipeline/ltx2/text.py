"""LTX-2's text conditioning as our `TextEncoder` (model/text.py protocol): Gemma 3 + connectors.

prompts → tokenizer (left padding to `max_len` tokens, as LTX-2 does) → Gemma 3's language model
(transformers), all its hidden states stacked and flattened ([B, L, 3840 · 49] for Gemma-3-12B)
→ diffusers' `LTX2TextConnectors` → video text [B, L, 3840] and audio text [B, L, 3840] + mask.
Our `text_emb` for the ltx2 arch is [video | audio] along features ([B, L, 7680], model/ltx2.py's
caption projections split it in half) and `mask` [B, L] bool is the connectors' own (all True
for LTX-2.0, whose registers fill the padding). Both steps are diffusers' code:
`LTX2Pipeline._get_gemma_prompt_embeds` (called on this module, which has the `tokenizer` and
`text_encoder` it reads) and the connectors' forward.

Only Gemma's language model is kept (LTX-2 ships `Gemma3ForConditionalGeneration`; its vision
tower and LM head take no part in a text prompt's hidden states, and the test checks the
outputs equal the full model's). The tokenizer's files travel inside the module as one uint8
buffer (`tokenizer_blob`: JSON of base64 file contents), so a bundle's text.safetensors carries
them under the bundle's sha256 manifest and nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.ltx2.codecs import _diffusers_config, build_module


def pack_files(folder: str | Path) -> torch.Tensor:
    """Every file of a tokenizer folder → uint8 [N] (JSON of {name: base64 bytes})."""
    files = {
        p.name: base64.b64encode(p.read_bytes()).decode()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }
    return torch.frombuffer(bytearray(json.dumps(files).encode()), dtype=torch.uint8).clone()


def load_tokenizer(blob: torch.Tensor) -> Any:
    """The tokenizer packed by `pack_files` (written to a temporary folder, read by transformers)."""
    from transformers import AutoTokenizer

    files = json.loads(bytes(blob.cpu().numpy().tobytes()).decode())
    with tempfile.TemporaryDirectory(prefix="ltx2-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(base64.b64decode(data))
        return AutoTokenizer.from_pretrained(tmp)


def language_model(model: nn.Module) -> nn.Module:
    """Gemma 3's text model inside a transformers Gemma 3 model (ForConditionalGeneration,
    ForCausalLM or the text model itself)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


class LTX2TextEncoder(nn.Module):
    """Gemma 3 + LTX-2's connectors → [video | audio] text features (module docstring)."""

    def __init__(
        self, gemma: nn.Module, connectors: nn.Module, tokenizer_blob: torch.Tensor, max_len=1024
    ) -> None:
        super().__init__()
        self.text_encoder = gemma.eval().requires_grad_(False)
        self.connectors = connectors.eval().requires_grad_(False)
        self.register_buffer("tokenizer_blob", tokenizer_blob)
        self.tokenizer = load_tokenizer(tokenizer_blob)
        self.max_len = int(max_len)
        c = connectors.config
        video = c.video_connector_num_attention_heads * c.video_connector_attention_head_dim
        audio = c.audio_connector_num_attention_heads * c.audio_connector_attention_head_dim
        self.dim = video + audio

    def config(self) -> dict[str, Any]:
        gemma = self.text_encoder.config.to_dict()
        gemma.pop("transformers_version", None)
        return {
            "class": type(self).__name__,
            "gemma": gemma,
            "connectors": _diffusers_config(self.connectors),
            "max_len": self.max_len,
        }

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> LTX2TextEncoder:
        """From a bundle's config entry and text.safetensors (keys text_encoder.*, connectors.*,
        tokenizer_blob)."""
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
        from transformers import AutoConfig, AutoModel

        gemma_cfg = AutoConfig.for_model(**config["gemma"])
        part = {
            p: {k[len(p) + 1 :]: v for k, v in state.items() if k.startswith(p + ".")}
            for p in ("text_encoder", "connectors")
        }
        gemma = build_module(AutoModel, gemma_cfg, part["text_encoder"])
        connectors = build_module(LTX2TextConnectors, config["connectors"], part["connectors"])
        return cls(gemma, connectors, state["tokenizer_blob"], config["max_len"])

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts → (emb [B, max_len, dim] float32, mask [B, max_len] bool)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

        if isinstance(prompts, str):
            raise TypeError("LTX2TextEncoder takes a list of prompts, not a single string")
        dev = self.tokenizer_blob.device
        dtype = next(self.connectors.parameters()).dtype
        embeds, mask = LTX2Pipeline._get_gemma_prompt_embeds(
            self, list(prompts), max_sequence_length=self.max_len, device=dev, dtype=dtype
        )
        side = getattr(self.tokenizer, "padding_side", "left")
        video, audio, out_mask = self.connectors(embeds, mask, padding_side=side)
        return torch.cat([video, audio], dim=-1).float(), out_mask.bool()
