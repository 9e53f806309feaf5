"""Text conditioning: the `TextEncoder` protocol and the embedded trainable word encoder.

LTX-2 uses Gemma-3 features (3840-d) in the same slot; the embedded default is a small encoder over
caption words, built from the data's vocabulary (no downloaded weights). The empty prompt "" maps to
a single learned null token: it is the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

_WORD = re.compile(r"[a-z0-9]+")
SPECIALS = ("<null>", "<unk>")


@runtime_checkable
class TextEncoder(Protocol):
    dim: int

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts → (emb [B, L, dim], mask [B, L] bool, True = a real token)."""
        ...


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_vocab(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Sorted word list of the given captions (specials excluded; they are added by the encoder)."""
    return sorted({w for t in texts for w in words(t)})


class WordTextEncoder(nn.Module):
    """Word embeddings + learned positions + a small transformer encoder."""

    def __init__(self, vocab: list[str], dim: int = 64, max_len: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.vocab = list(vocab)
        self.dim, self.max_len, self.num_layers = dim, max_len, layers
        self.index = {w: i for i, w in enumerate((*SPECIALS, *self.vocab))}
        self.embed = nn.Embedding(len(self.index), dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=max(1, dim // 32), dim_feedforward=2 * dim, batch_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def config(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab,
            "dim": self.dim,
            "max_len": self.max_len,
            "layers": self.num_layers,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WordTextEncoder:
        return cls(**config)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ ids [B, L] long, mask [B, L] bool; "" becomes the single <null> token."""
        unk, null = self.index["<unk>"], self.index["<null>"]
        seqs = [
            [self.index.get(w, unk) for w in words(p)][: self.max_len] or [null] for p in prompts
        ]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), null, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return ids, mask

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("WordTextEncoder takes a list of prompts, not a single string")
        ids, mask = self.tokenize(prompts)
        dev = self.pos.device
        ids, mask = ids.to(dev), mask.to(dev)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return x, mask
