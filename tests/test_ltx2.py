"""Our AVDiT on the "ltx2" arch is diffusers' LTX2VideoTransformer3DModel: same weights (through
the key map) and inputs give the same video and audio outputs; imports refuse bad weight files."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from model import AVDiT, Bundle, BundleError, StreamingGenerator
from model.bundle import sha256_file
from model.dit_bundle import load_dit_bundle
from model.testing import tiny_bundle
from pipeline.cli import app
from pipeline.ltx2.config import DIFFUSERS_DEFAULTS, model_config_from_diffusers
from pipeline.ltx2.importer import import_ltx2, load_ltx2
from pipeline.ltx2.keymap import key_map, to_diffusers

B, FV, FA, H, W = 2, 4, 26, 2, 3  # 1 s after the prefix: 4 video latents of 2×3, 26 audio
TINY = dict(  # the reference note's tiny LTX-2 (≈ 38 k parameters)
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    audio_in_channels=4,
    audio_out_channels=4,
    audio_num_attention_heads=2,
    audio_attention_head_dim=4,
    audio_cross_attention_dim=8,
    num_layers=2,
    caption_channels=12,
)


def reference(seed: int = 0, **changes) -> LTX2VideoTransformer3DModel:
    """A tiny random diffusers LTX-2 with every tensor drawn afresh (tables included), so no
    weight sits at a neutral initial value that would hide a mix-up."""
    torch.manual_seed(seed)
    ref = LTX2VideoTransformer3DModel(**(TINY | changes)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return ref


def ours_from(ref: LTX2VideoTransformer3DModel) -> AVDiT:
    cfg = model_config_from_diffusers(dict(ref.config), latent_hw=(H, W), name="tiny-ltx2")
    ours = AVDiT(cfg).eval()
    names = key_map(list(ours.state_dict()))
    ours.load_state_dict({names[k]: v for k, v in ref.state_dict().items()})
    return ours


def inputs(seed: int = 1):
    """Latents, per-frame σ that differ frame to frame, [video | audio] text, a padded prompt."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, FV, H, W, TINY["in_channels"], generator=g)
    a = torch.randn(B, FA, TINY["audio_in_channels"], generator=g)
    sv, sa = torch.rand(B, FV, generator=g), torch.rand(B, FA, generator=g)
    text = torch.randn(B, 5, 2 * TINY["caption_channels"], generator=g)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return v, a, sv, sa, text, mask


def diffusers_forward(ref, v, a, sv, sa, text, mask):
    """diffusers' call: tokens in (frame, h, w) order, per-token timesteps × 1000."""
    half = text.shape[-1] // 2
    out_v, out_a = ref(
        hidden_states=v.flatten(1, 3),
        audio_hidden_states=a,
        encoder_hidden_states=text[..., :half],
        audio_encoder_hidden_states=text[..., half:],
        timestep=sv.repeat_interleave(H * W, dim=1) * 1000,
        audio_timestep=sa * 1000,
        encoder_attention_mask=mask.float(),
        audio_encoder_attention_mask=mask.float(),
        num_frames=FV,
        height=H,
        width=W,
        fps=24.0,
        audio_num_frames=FA,
        return_dict=False,
    )
    return out_v, out_a


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("gate_multiplier", [1000, 1])
def test_forward_equals_diffusers(gate_multiplier: int) -> None:
    """Video and audio outputs within 1e-4 relative (float32); gate_multiplier 1 feeds the
    cross-modal gate raw σ (the original LTX-2 code's av_ca_timestep_scale_multiplier)."""
    ref = reference(cross_attn_timestep_scale_multiplier=gate_multiplier)
    ours = ours_from(ref)
    v, a, sv, sa, text, mask = inputs()
    assert (sv[:, 1:] != sv[:, :1]).all()  # per-frame timesteps really differ
    with torch.no_grad():
        want_v, want_a = diffusers_forward(ref, v, a, sv, sa, text, mask)
        got_v, got_a = ours(v, a, sv, sa, text, mask)
    assert got_v.shape == v.shape and got_a.shape == a.shape
    assert rel_err(got_v.flatten(1, 3), want_v) < 1e-4
    assert rel_err(got_a, want_a) < 1e-4


def test_equality_is_sensitive_to_each_ltx2_difference() -> None:
    """The comparison can fail: our own cross-modal row order, or V2A keys taken after A2V,
    are far off diffusers."""
    ref = reference()
    v, a, sv, sa, text, mask = inputs()
    with torch.no_grad():
        want_v, want_a = diffusers_forward(ref, v, a, sv, sa, text, mask)
    for change in ({"_cross_rows": (0, 1, 2, 3)}, {"_v2a_keys_before_a2v": False}):
        ours = ours_from(ref)
        for layer in ours.layers:
            for name, value in change.items():
                setattr(layer, name, value)
        with torch.no_grad():
            _, got_a = ours(v, a, sv, sa, text, mask)
        assert rel_err(got_a, want_a) > 1e-2, change


def test_key_map_covers_both_models_one_to_one() -> None:
    ref = reference()
    cfg = model_config_from_diffusers(dict(ref.config), latent_hw=(H, W))
    ours = AVDiT(cfg.replace(causal=True))  # the student: sinks are ours only
    names = key_map(list(ours.state_dict()))
    theirs = ref.state_dict()
    assert set(names) == set(theirs)
    assert sorted(set(ours.state_dict()) - set(names.values())) == ["audio_sinks"]
    assert to_diffusers("layers.1.a2v.to_out.weight") == (
        "transformer_blocks.1.audio_to_video_attn.to_out.0.weight"
    )
    assert to_diffusers("audio_io.cross_gate.linear_1.bias") == (
        "av_cross_attn_audio_v2a_gate.emb.timestep_embedder.linear_1.bias"
    )
    assert to_diffusers("video_io.out_table") == "scale_shift_table"
    for ours_key, t in ((names[k], v) for k, v in theirs.items()):
        assert ours.state_dict()[ours_key].shape == t.shape, ours_key


def test_config_defaults_are_diffusers_and_ltx2_preset() -> None:
    params = inspect.signature(LTX2VideoTransformer3DModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}
    assert DIFFUSERS_DEFAULTS == defaults
    from model import preset

    cfg = model_config_from_diffusers({})  # LTX-2.0 = the defaults
    assert cfg.replace(name="ltx2") == preset("ltx2")
    with pytest.raises(ValueError, match=r"gated_attn=True .*cross_attention_dim=512"):
        model_config_from_diffusers({"gated_attn": True, "cross_attention_dim": 512})


# ---- import: diffusers folder (local or S3) → DiT bundle -----------------------------------------


def _saved(tmp_path: Path, ref: LTX2VideoTransformer3DModel) -> Path:
    src = tmp_path / "src"
    ref.save_pretrained(src, max_shard_size="40KB")  # several shards + an index, as LTX-2 ships
    assert len(list(src.glob("*.safetensors"))) > 1
    return src


def test_cli_import_gives_diffusers_outputs_and_records_the_source(tmp_path: Path) -> None:
    ref = reference()
    src = _saved(tmp_path, ref)
    out = tmp_path / "bundle"
    args = ["import", "ltx2", "--from", str(src), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--latent-hw", f"{H},{W}", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "DiT only" in result.output and "not imported yet" in result.output
    model = load_dit_bundle(out)
    v, a, sv, sa, text, mask = inputs()
    with torch.no_grad():
        want_v, want_a = diffusers_forward(ref, v, a, sv, sa, text, mask)
        got_v, got_a = model(v, a, sv, sa, text, mask)
    assert rel_err(got_v.flatten(1, 3), want_v) < 1e-4 and rel_err(got_a, want_a) < 1e-4
    source = json.loads((out / "config.json").read_text())["source"]
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(source["files"]) == shards
    assert all(source["files"][n] == sha256_file(src / n) for n in shards)
    assert source["config_sha256"] == sha256_file(src / "config.json")
    assert "Gemma" in source["missing"] and source["path"] == str(src)
    with pytest.raises(BundleError):  # not a teacher bundle: no codecs, no text encoder
        Bundle.from_pretrained(out)


def test_import_from_s3_matches_the_local_import(tmp_path: Path, s3_bucket: str) -> None:
    """s3:// through s3fs, bf16 on disk (the default): the same tensors and hashes as locally."""
    from data.shards import resolve

    src = _saved(tmp_path, reference())
    fs, root = resolve(f"{s3_bucket}/ltx2")
    fs.put(str(src), f"{root}/transformer", recursive=True)  # a pipeline folder's layout
    local = import_ltx2(str(src), tmp_path / "local", latent_hw=(H, W))
    remote = import_ltx2(f"{s3_bucket}/ltx2", tmp_path / "remote", latent_hw=(H, W))
    a, b = load_file(local / "model.safetensors"), load_file(remote / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.bfloat16}
    src_of = {d: json.loads((d / "config.json").read_text())["source"] for d in (local, remote)}
    assert src_of[local]["files"] == src_of[remote]["files"]


def _tampered(tmp_path: Path, change) -> Path:
    """A diffusers folder whose single weight file went through `change(state)`."""
    ref = reference()
    src = tmp_path / "bad"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(ref.config)))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    change(state)
    save_file(state, src / "diffusion_pytorch_model.safetensors")
    return src


RENAMED = "transformer_blocks.0.attn1.to_q.weight"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda s: s.update({RENAMED + "x": s.pop(RENAMED)}),
            [f"missing ['{RENAMED}']", f"unexpected ['{RENAMED}x']"],
        ),
        (lambda s: s.pop("audio_proj_out.bias"), ["missing ['audio_proj_out.bias']"]),
        (
            lambda s: s.update({"proj_in.weight": torch.zeros(16, 9)}),
            ["wrong shape ['proj_in.weight (16, 9) expected (16, 8)']"],
        ),
    ],
    ids=["renamed", "missing", "shape"],
)
def test_bad_weights_are_refused_in_one_line_naming_the_key(tmp_path: Path, change, named):
    src = _tampered(tmp_path, change)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        app, ["import", "ltx2", "--from", str(src), "--out", str(out), "--latent-hw", f"{H},{W}"]
    )
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # the console may wrap the one line
    assert all(n in message for n in named), message
    assert "Traceback" not in result.output and not out.exists()
    with pytest.raises(ValueError, match=re.escape(named[0])):
        load_ltx2(str(src), latent_hw=(H, W))


def test_ltx2_arch_bundle_round_trip_and_stream(tmp_path: Path) -> None:
    """The new config fields survive config.json; a causal ltx2-arch student streams."""
    b = tiny_bundle(seed=2, arch="ltx2")
    b.save_pretrained(tmp_path / "b")
    c = Bundle.from_pretrained(tmp_path / "b")
    assert c.config == b.config and c.config.arch == "ltx2"
    chunks = list(StreamingGenerator(c).stream("a red ball", 1, seed=3))
    again = list(StreamingGenerator(b).stream("a red ball", 1, seed=3))
    assert [k.frames.shape[0] for k in chunks] == [1, 24]
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(chunks, again, strict=True))
