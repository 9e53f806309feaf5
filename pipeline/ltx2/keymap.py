"""diffusers' LTX-2.0 transformer ↔ our AVDiT (arch "ltx2"): state-dict names.

`to_diffusers(key)` names the diffusers tensor that fills each of our weights: a pure renaming,
every tensor keeps its shape and layout (our ltx2 modules read LTX-2's row orders themselves).
The config side is pipeline/ltx2/config.py.
"""

from __future__ import annotations

# Ours → diffusers, by prefix. Stream-level modules first, then per-layer ones.
_STREAM = {
    "patchify.": ("proj_in.", "audio_proj_in."),
    "caption.0.": ("caption_projection.linear_1.", "audio_caption_projection.linear_1."),
    "caption.2.": ("caption_projection.linear_2.", "audio_caption_projection.linear_2."),
    "time.": ("time_embed.", "audio_time_embed."),
    "cross_time.": ("av_cross_attn_video_scale_shift.", "av_cross_attn_audio_scale_shift."),
    "cross_gate.": ("av_cross_attn_video_a2v_gate.", "av_cross_attn_audio_v2a_gate."),
    "out_table": ("scale_shift_table", "audio_scale_shift_table"),
    "proj_out.": ("proj_out.", "audio_proj_out."),
}
# Inside an AdaLayerNormSingle: diffusers nests the two timestep linears one level deeper.
_ADA = {
    "linear_1.": "emb.timestep_embedder.linear_1.",
    "linear_2.": "emb.timestep_embedder.linear_2.",
    "linear.": "linear.",
}
_LAYER = {
    "v_self.": "attn1.",
    "a_self.": "audio_attn1.",
    "v_text.": "attn2.",
    "a_text.": "audio_attn2.",
    "a2v.": "audio_to_video_attn.",
    "v2a.": "video_to_audio_attn.",
    "v_ffn.up.": "ff.net.0.proj.",
    "v_ffn.down.": "ff.net.2.",
    "a_ffn.up.": "audio_ff.net.0.proj.",
    "a_ffn.down.": "audio_ff.net.2.",
    "v_table": "scale_shift_table",
    "a_table": "audio_scale_shift_table",
    "v_cross_table": "video_a2v_cross_attn_scale_shift_table",
    "a_cross_table": "audio_a2v_cross_attn_scale_shift_table",
}
_ATTN = {"to_q.": "to_q.", "to_k.": "to_k.", "to_v.": "to_v.", "to_out.": "to_out.0."}
_ATTN |= {"q_norm.": "norm_q.", "k_norm.": "norm_k."}
# Ours with no diffusers counterpart: OmniForcing's audio sinks (student only, initialised fresh).
OURS_ONLY = ("audio_sinks",)


def _swap(key: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if key == ours.rstrip(".") or key.startswith(ours):
            return theirs + key[len(ours) :] if ours.endswith(".") else theirs
    return None


def to_diffusers(key: str) -> str | None:
    """Our state-dict key → diffusers' (None: ours only, e.g. the audio sinks)."""
    if key in OURS_ONLY:
        return None
    head, _, rest = key.partition(".")
    if head in ("video_io", "audio_io"):
        side = 0 if head == "video_io" else 1
        for ours, theirs in _STREAM.items():
            if rest == ours or rest.startswith(ours):
                tail = rest[len(ours) :]
                if ours in ("time.", "cross_time.", "cross_gate."):
                    tail = _swap(tail, _ADA)
                if tail is not None:
                    return theirs[side] + tail
    if head == "layers":
        index, _, rest = rest.partition(".")
        for ours, theirs in _LAYER.items():
            if rest == ours or rest.startswith(ours):
                tail = rest[len(ours) :]
                if ours.endswith("self.") or ours.endswith("text.") or ours in ("a2v.", "v2a."):
                    tail = _swap(tail, _ATTN)
                if tail is not None:
                    return f"transformer_blocks.{index}.{theirs}{tail}"
    raise KeyError(f"no diffusers name for our key {key!r}")


def key_map(our_keys: list[str]) -> dict[str, str]:
    """{diffusers key: our key} for every one of `our_keys` that diffusers has."""
    out = {}
    for key in our_keys:
        theirs = to_diffusers(key)
        if theirs is not None:
            out[theirs] = key
    return out
