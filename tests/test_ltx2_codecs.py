"""LTX-2's codecs and text encoder (pipeline/ltx2) behind our protocols, and full LTX-2 bundles.

Tiny random components in diffusers/transformers format (tests/ltx2_tiny.py; no download), saved
as an LTX2Pipeline folder, imported, loaded by `Bundle.from_pretrained` and streamed from.

Chunk-local decode, measured on these tiny random VAEs (4 one-second chunks against one
whole-clip decode; figures also in docs/operations.md):
- video, a decoder that is causal in time, 12 latents of context: max |Δ| 1/255 (rounding),
  so the left edge is exact once the context covers the decoder's reach (this tiny decoder
  reaches 9-12 latents back: 6 latents of context leave max 76/255, relative L2 0.12);
- video, LTX-2.0's non-causal decoder: the frames of each chunk read the *next* latents, which a
  stream does not have yet, so chunk decode differs from whole-clip decode whatever the context
  (random weights amplify it: 3 latents of context give max 211/255, relative L2 0.62; none
  0.87); only a trained VAE's figure means anything, and none can be downloaded here;
- audio (causal VAE, non-causal vocoder + 24 → 16 kHz resampler), 25 latents of context: exact
  up to the last ~50 ms of each chunk, where the vocoder reads ahead: max |Δ| 0.05 on a signal
  of peak 0.28, relative L2 1.5 % over the clip (1.8 % without context).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model import AVDiT, Bundle, BundleError, StreamingGenerator
from pipeline.cli import app
from tests import ltx2_tiny as tiny

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 of x − ref against ref's own variation."""
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / (ref - ref.mean()).norm())


def chunked(codec, z: torch.Tensor, block: int, context: bool = True) -> torch.Tensor:
    """Decode the prefix latent, then `block` latents at a time behind their context and with
    the codec's look-ahead (what StreamingGenerator does), concatenated along time."""
    from model.streaming import ChunkDecoder

    axis = 0 if z.ndim == 4 else 1
    dec = ChunkDecoder(codec, time_axis=axis)
    parts = [dec.push(z[:1], 0)]
    for s in range(1, len(z), block):
        if not context:
            dec.context = None
        parts.append(dec.push(z[s : s + block], s))
    tail = dec.flush()
    return torch.cat(parts + ([] if tail is None else [tail]), dim=axis)


def test_video_codec_shapes_and_chunk_local_drift() -> None:
    from pipeline.ltx2.codecs import LTX2VideoCodec

    codec = LTX2VideoCodec(tiny.video_vae(), tiny.LATENT_HW)
    frames = (torch.rand(1 + 8 * 3, *tiny.FRAME_HW, 3) * 255).to(torch.uint8)
    z = codec.encode(frames)
    assert z.shape == (4, *tiny.LATENT_HW, 8) and z.dtype == torch.float32
    assert codec.decode(z).shape == (25, *tiny.FRAME_HW, 3)
    assert codec.decode(z[1:], start=1).shape == (24, *tiny.FRAME_HW, 3)  # 8 frames per latent
    assert codec.decode(z[1:], start=1, context=z[:1]).dtype == torch.uint8

    torch.manual_seed(1)
    z = torch.randn(1 + 3 * 4, *tiny.LATENT_HW, 8)  # 4 s
    causal = LTX2VideoCodec(tiny.video_vae(decoder_causal=True), tiny.LATENT_HW, 12)
    whole = causal.decode(z)
    assert (chunked(causal, z, 3).float() - whole.float()).abs().max() <= 1  # rounding only
    causal.context_latents = 6  # shorter than this decoder's reach: drift appears
    assert rel(chunked(causal, z, 3), whole) > 0.01
    ltx20 = LTX2VideoCodec(tiny.video_vae(), tiny.LATENT_HW)  # non-causal, as LTX-2.0 ships
    drift = rel(chunked(ltx20, z, 3), ltx20.decode(z))
    assert 0 < drift < 1.0  # the next second's latents are missing: reported, not zero


def test_lookahead_trades_latency_for_exact_chunk_boundaries() -> None:
    """Holding each chunk's last L latents back until the next chunk (ChunkDecoder) lets the
    non-causal decoder read what follows: drift falls with L and vanishes once context and
    look-ahead cover the decoder's reach (this tiny one: 6 latents); audio is exact at 2 (80 ms).
    Figures for LTX-2.0's own decoder structure: docs/operations.md."""
    from pipeline.ltx2.audio import LTX2AudioCodec
    from pipeline.ltx2.codecs import LTX2VideoCodec

    torch.manual_seed(1)
    z = torch.randn(1 + 3 * 4, *tiny.LATENT_HW, 8)
    vae = tiny.video_vae()
    drift = {}
    for ahead in (0, 3, 6):
        codec = LTX2VideoCodec(vae, tiny.LATENT_HW, 6, lookahead_latents=ahead)
        whole, got = codec.decode(z), chunked(codec, z, 3)
        assert got.shape == whole.shape
        drift[ahead] = rel(got, whole)
    assert drift[0] > 0.3 and drift[3] < drift[0] / 5 and drift[6] < 1e-3  # 0.61, 0.045, 0.0
    assert codec.config()["lookahead_latents"] == 6
    assert LTX2VideoCodec.from_state(codec.config(), codec.state()).lookahead_latents == 6

    torch.manual_seed(2)
    z = torch.randn(1 + 25 * 3, 8)
    codec = LTX2AudioCodec(tiny.audio_vae(), tiny.vocoder(), lookahead_latents=2)
    whole, got = codec.decode(z), chunked(codec, z, 25)
    assert got.shape == whole.shape and (got - whole).abs().max() < 1e-5


def test_audio_codec_shapes_and_chunk_local_drift() -> None:
    from pipeline.ltx2.audio import LTX2AudioCodec

    codec = LTX2AudioCodec(tiny.audio_vae(), tiny.vocoder())
    assert (codec.latents_per_second, codec.latent_channels, codec.sample_rate) == (25, 8, 16000)
    t = torch.arange(640 * 51) / 16000
    wave = 0.3 * torch.sin(2 * torch.pi * 440 * t)[None]  # mono 2.04 s → duplicated to stereo
    z = codec.encode(wave)
    assert z.shape == (51, 8)
    assert codec.decode(z).shape == (2, 160 + 640 * 50)  # prefix latent = one 10 ms mel frame
    assert codec.decode(z[1:26], start=1).shape == (2, 16000)  # one second

    torch.manual_seed(2)
    z = torch.randn(1 + 25 * 3, 8)
    whole = codec.decode(z)
    got = chunked(codec, z, 25)
    assert got.shape == whole.shape
    err = (got - whole).abs().amax(0)[160:].reshape(3, 16000)  # per chunk
    assert err[:, :15000].max() < 1e-5  # exact but for the vocoder's look-ahead at the end
    assert rel(got, whole) < 0.05
    assert rel(got, whole) < rel(chunked(codec, z, 25, context=False), whole)


def test_text_encoder_equals_the_diffusers_pipeline() -> None:
    """[video | audio] connector features of our encoder (Gemma's language model only) equal
    LTX2Pipeline's prompt encoding with the whole Gemma3ForConditionalGeneration."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    from pipeline.ltx2.text import LTX2TextEncoder, language_model, pack_files

    gemma, connectors, tok = tiny.gemma(), tiny.connectors(), tiny.tokenizer()

    class Ref:  # what LTX2Pipeline._get_gemma_prompt_embeds reads
        tokenizer, text_encoder = tok, gemma

    prompts = ["a small red ball bounces", ""]
    emb, mask = LTX2Pipeline._get_gemma_prompt_embeds(
        Ref(), prompts, max_sequence_length=tiny.MAX_LEN, device="cpu", dtype=torch.float32
    )
    with torch.no_grad():
        v, a, m = connectors(emb, mask, padding_side="left")
    folder = Path(__import__("tempfile").mkdtemp())
    tok.save_pretrained(folder)
    ours = LTX2TextEncoder(language_model(gemma), connectors, pack_files(folder), tiny.MAX_LEN)
    got, got_mask = ours(prompts)
    assert ours.dim == 32 and got.shape == (2, tiny.MAX_LEN, 32)
    assert torch.allclose(got, torch.cat([v, a], -1), atol=1e-5)
    assert torch.equal(got_mask, m.bool())
    assert not torch.allclose(got[0], got[1])  # the prompt matters


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A tiny LTX2Pipeline folder imported with the CLI into a full teacher bundle."""
    root = tmp_path_factory.mktemp("ltx2")
    src = tiny.pipeline_folder(root / "src")
    out = root / "teacher"
    args = ["import", "ltx2", "--from", str(src), "--out", str(out), "--dtype", "float32"]
    args += ["--latent-hw", "2,2", "--max-len", str(tiny.MAX_LEN)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "teacher bundle" in result.output
    return out


def test_full_bundle_loads_and_a_student_streams(imported: Path, tmp_path: Path) -> None:
    teacher = Bundle.from_pretrained(imported)
    assert type(teacher.video_codec).__name__ == "LTX2VideoCodec"
    assert type(teacher.text_encoder).__name__ == "LTX2TextEncoder"
    source = json.loads((imported / "config.json").read_text())["extra"]["source"]
    assert source["path"].endswith("src") and source["files"]
    # Registered, it asks for the diffusers/transformers it was written with; ours do not.
    from importlib.metadata import version

    from model.testing import tiny_bundle
    from pipeline.registry import requirements

    assert f"diffusers=={version('diffusers')}" in requirements(imported)
    assert f"transformers=={version('transformers')}" in requirements(imported)
    assert f"accelerate=={version('accelerate')}" in requirements(imported)
    tiny_bundle().save_pretrained(tmp_path / "ours")
    assert requirements(tmp_path / "ours") == ["mlflow", "torch", "safetensors"]
    # The causal student of this teacher (what distillation starts from) streams through the
    # teacher's codecs and text encoder, saved and reloaded as a bundle.
    torch.manual_seed(0)
    student = AVDiT(teacher.config.replace(causal=True))
    student.load_state_dict(teacher.model.state_dict(), strict=False)  # all but the sinks
    Bundle(student, teacher.video_codec, teacher.audio_codec, teacher.text_encoder).save_pretrained(
        tmp_path / "student"
    )
    chunks = list(
        StreamingGenerator(Bundle.from_pretrained(tmp_path / "student")).stream(
            "a red ball", 2, seed=1
        )
    )
    assert [c.frames.shape for c in chunks] == [(n, 64, 64, 3) for n in (1, 24, 24)]
    # Audio holds 2 latents (80 ms) back for the vocoder (import default): chunk 0 has none,
    # the last one carries the tail, the clip's total is unchanged.
    assert [c.audio.shape for c in chunks] == [(2, 0), (2, 14880), (2, 17280)]
    lagged = Bundle.from_pretrained(tmp_path / "student")
    lagged.video_codec.lookahead_latents = 2
    again = list(StreamingGenerator(lagged).stream("a red ball", 2, seed=1))
    assert [c.frames.shape[0] for c in again] == [0, 9, 40]  # 16 frames later, same total
    assert [c.t_start for c in again[1:]] == [c.t_end for c in again[:-1]] == [0.0, 9 / 24]
    assert torch.equal(
        torch.cat([c.audio for c in again], 1), torch.cat([c.audio for c in chunks], 1)
    )
    result = CliRunner().invoke(
        app,
        ["generate", "--model", str(tmp_path / "student"), "--prompt", "a red ball"]
        + ["--seconds", "1", "--out", str(tmp_path / "clip.mp4")],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "clip.mp4").stat().st_size > 0


def test_tampered_or_dit_only_bundles_are_refused_in_one_line(imported: Path, tmp_path: Path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(imported, bad)
    with open(bad / "codecs.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(BundleError, match="codecs.safetensors: checksum"):
        Bundle.from_pretrained(bad)
    src = tiny.pipeline_folder(tmp_path / "dit-src", parts=("transformer",))
    out = tmp_path / "dit"
    result = CliRunner().invoke(
        app, ["import", "ltx2", "--from", str(src), "--out", str(out), "--latent-hw", "2,2"]
    )
    assert result.exit_code == 0 and "DiT only" in " ".join(result.output.split())
    with pytest.raises(BundleError) as err:
        Bundle.from_pretrained(out)
    msg = str(err.value)
    assert "\n" not in msg and "DiT-only" in msg and "omniforcing import ltx2" in msg
