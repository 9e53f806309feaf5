"""Unit tests of the serving protocol, engine, mp4 writer and in-process client (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.engine import Engine, Overloaded
from deploy.models import load_model
from deploy.mp4writer import Mp4Writer, probe
from deploy.protocol import (
    GenerateRequest,
    PartReader,
    RequestError,
    decode_part,
    encode_chunk,
    encode_part,
    parse_request,
)
from deploy.synthetic import SyntheticChunk


def _chunk(index: int = 1, frames: int = 24, torch_tensors: bool = False) -> SyntheticChunk:
    rng = np.random.default_rng(index)
    f = rng.integers(0, 256, (frames, 8, 6, 3), dtype=np.uint8)
    a = rng.standard_normal((2, 16000 if frames > 1 else 640)).astype(np.float32)
    if torch_tensors:
        f, a = torch.from_numpy(f), torch.from_numpy(a)
    return SyntheticChunk(index, f, a, 1 / 24, 25 / 24, 0.5)


@pytest.mark.parametrize("torch_tensors", [False, True])
def test_chunk_round_trip_is_exact(torch_tensors: bool) -> None:
    chunk = _chunk(torch_tensors=torch_tensors)
    part = decode_part(encode_chunk(chunk, elapsed_s=1.25))
    assert part.type == "chunk"
    assert part.header["frames"] == [24, 8, 6, 3] and part.header["audio"] == [2, 16000]
    assert part.header["index"] == 1 and part.header["elapsed_s"] == 1.25
    np.testing.assert_array_equal(part.frames, np.asarray(chunk.frames))
    np.testing.assert_array_equal(part.audio, np.asarray(chunk.audio))
    assert part.audio.dtype == np.float32 and part.frames.dtype == np.uint8


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=30))
def test_reader_reassembles_parts_from_any_slicing(cuts: list[int]) -> None:
    stream = (
        encode_part({"type": "start", "stream_id": "x"})
        + encode_chunk(_chunk(0, frames=1), 0.1)
        + encode_chunk(_chunk(1), 0.2)
        + encode_part({"type": "end", "cancelled": False})
    )
    reader, parts, pos = PartReader(), [], 0
    for cut in cuts:
        parts += reader.feed(stream[pos : pos + cut])
        pos += cut
    parts += reader.feed(stream[pos:])
    assert [p.type for p in parts] == ["start", "chunk", "chunk", "end"]
    assert [p.header.get("index") for p in parts[1:3]] == [0, 1]
    np.testing.assert_array_equal(parts[2].frames, _chunk(1).frames)
    assert reader.pending == 0


def test_decode_rejects_truncated_and_inconsistent_parts() -> None:
    data = encode_chunk(_chunk(), 0.0)
    with pytest.raises(ValueError, match="one whole part"):
        decode_part(data[:-10])
    head = json.dumps({"type": "chunk", "index": 3, "frames": [2, 2, 2, 3], "audio": [1, 4]})
    bad = len(head).to_bytes(4, "big") + head.encode()
    with pytest.raises(ValueError, match="chunk 3: payload size"):
        decode_part(bad)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (b'{"seconds": 2}', 422, "prompt"),
        (b'{"prompt": "", "seconds": 2}', 422, "prompt"),
        (b'{"prompt": "   ", "seconds": 2}', 422, "prompt"),
        (json.dumps({"prompt": "x" * 2001, "seconds": 2}).encode(), 422, "prompt"),
        (b'{"prompt": 5, "seconds": 2}', 422, "prompt"),
        (b'{"prompt": "a"}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": 0}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": -1}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": 11}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": "2"}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": true}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": 1.5}', 422, "seconds"),
        (b'{"prompt": "a", "seconds": 2, "seed": -3}', 422, "seed"),
        (b'{"prompt": "a", "seconds": 2, "seed": "x"}', 422, "seed"),
        (b'{"prompt": "a", "seconds": 2, "fps": 30}', 422, "fps"),
        (b'{"prompt": "' + b"a" * 20000 + b'", "seconds": 2}', 413, None),
    ],
)
def test_bad_requests_name_the_field(body: bytes, status: int, field: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(body, max_seconds=10)
    assert info.value.status == status and info.value.field == field
    assert info.value.to_json()["error"]["message"]


def test_good_request_is_normalised() -> None:
    req = parse_request(b'{"prompt": "  a red ball ", "seconds": 3.0}', max_seconds=10)
    assert req == GenerateRequest(prompt="a red ball", seconds=3, seed=0)


async def _collect(engine: Engine, req: GenerateRequest, cancel_after: int | None = None):
    sid, cancel, parts = engine.admit(), asyncio.Event(), []
    async for raw in engine.stream(sid, req, cancel):
        parts.append(decode_part(raw))
        if parts[-1].type == "chunk" and len(parts) - 1 == cancel_after:
            cancel.set()
    return parts


async def _first_then_close(parts) -> None:
    assert decode_part(await parts.__anext__()).type == "start"
    await parts.aclose()


def _wait_idle(engine: Engine) -> dict[str, int]:
    for _ in range(200):
        stats = engine.stats()
        if stats["active_streams"] == 0 and stats["live_generators"] == 0:
            return stats
        asyncio.run(asyncio.sleep(0.02))
    return engine.stats()


def test_engine_streams_cancels_and_frees_sessions() -> None:
    engine = Engine(load_model("synthetic:0.01"), max_streams=1)
    parts = asyncio.run(_collect(engine, GenerateRequest("a", 2)))
    assert [p.type for p in parts] == ["start", "chunk", "chunk", "chunk", "end"]
    assert [p.frames.shape[0] for p in parts[1:4]] == [1, 24, 24]
    assert parts[-1].header["cancelled"] is False and parts[-1].header["chunks"] == 3
    assert _wait_idle(engine)["active_streams"] == 0
    parts = asyncio.run(_collect(engine, GenerateRequest("a", 30), cancel_after=2))
    assert parts[-1].type == "end" and parts[-1].header["cancelled"] is True
    assert len([p for p in parts if p.type == "chunk"]) < 10
    stats = _wait_idle(engine)
    assert stats == {"active_streams": 0, "live_generators": 0, "max_streams": 1}
    held = engine.admit()
    with pytest.raises(Overloaded):
        engine.admit()
    engine.release(held)
    # A client gone right after the start part (before any worker) frees its slot too.
    sid = engine.admit()
    parts = engine.stream(sid, GenerateRequest("a", 2))
    asyncio.run(_first_then_close(parts))
    assert engine.stats()["active_streams"] == 0
    engine.admit()
    # An admitted stream that never starts (client gone before the body) is reclaimed.
    engine.start_timeout_s = 0.05
    asyncio.run(asyncio.sleep(0.1))
    engine.release(engine.admit())
    engine.shutdown()


def test_engine_runs_the_real_tiny_model_deterministically(tiny_bundle_dir) -> None:
    engine = Engine(load_model(str(tiny_bundle_dir)), max_streams=2)
    assert engine.model.info.preset == "tiny" and engine.model.info.version.startswith("sha256:")
    a = asyncio.run(_collect(engine, GenerateRequest("a red ball", 1, seed=7)))
    b = asyncio.run(_collect(engine, GenerateRequest("a red ball", 1, seed=7)))
    c = asyncio.run(_collect(engine, GenerateRequest("a red ball", 1, seed=8)))
    assert [p.type for p in a] == ["start", "chunk", "chunk", "end"]
    assert a[2].frames.shape == (24, 32, 32, 3) and a[2].audio.shape == (1, 16000)
    np.testing.assert_array_equal(a[2].frames, b[2].frames)
    np.testing.assert_array_equal(a[2].audio, b[2].audio)
    assert not np.array_equal(a[2].audio, c[2].audio)
    assert _wait_idle(engine)["live_generators"] == 0
    engine.shutdown()


def test_mp4_writer_is_atomic_and_probe_reads_back(tmp_path) -> None:
    out = tmp_path / "clip.mp4"
    with Mp4Writer(out, 24, 16000, 1) as w:
        w.write(np.zeros((1, 30, 30, 3), np.uint8), np.zeros((1, 640), np.float32))
        assert not out.exists()  # only the temporary file exists while writing
        w.write(np.full((24, 30, 30, 3), 200, np.uint8), 0.1 * np.ones((1, 16000), np.float32))
    info = probe(out)
    assert info["frames"] == 25 and info["fps"] == 24.0 and info["sample_rate"] == 16000
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert abs(info["audio_s"] - 16640 / 16000) < 1024 / 16000  # AAC pads to whole frames
    with pytest.raises(ValueError, match="audio must be"):
        with Mp4Writer(tmp_path / "bad.mp4", 24, 16000, 1) as w:
            w.write(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((2, 10), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_generate_locally_writes_a_playable_clip(tiny_bundle_dir, tmp_path) -> None:
    from deploy.client import generate_local, save_stream

    out = tmp_path / "local.mp4"
    stats = save_stream(generate_local(str(tiny_bundle_dir), "a blue ball", 1, seed=1), out)
    assert stats.chunks == 2 and stats.frames == 25 and stats.rtf > 0 and stats.ttfc_s > 0
    info = probe(out)
    assert info["frames"] == 25 and info["width"] == 32 and info["sample_rate"] == 16000


def test_generate_command_prints_figures_and_writes_mp4(tiny_bundle_dir, tmp_path) -> None:
    import typer
    from typer.testing import CliRunner

    from deploy.cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "cli.mp4"
    args = ["generate", "--model", str(tiny_bundle_dir), "--prompt", "a red ball"]
    result = CliRunner().invoke(app, [*args, "--seconds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "time to first chunk" in result.output and "real-time factor" in result.output
    assert probe(out)["frames"] == 25


def test_slow_client_bounds_chunks_generated_ahead() -> None:
    from deploy.models import LoadedModel, ModelInfo
    from deploy.synthetic import SyntheticGenerator

    produced: list[int] = []

    class Counting(SyntheticGenerator):
        def stream(self, prompt, seconds, seed):
            for chunk in super().stream(prompt, seconds, seed):
                produced.append(chunk.index)
                yield chunk

    loaded = LoadedModel(ModelInfo("t", "t", "0", None, None), lambda: Counting(delay=0.0))
    engine = Engine(loaded, max_streams=1, max_ahead=2)

    async def slow() -> list:
        sid, parts = engine.admit(), []
        async for raw in engine.stream(sid, GenerateRequest("a", 20)):
            parts.append(decode_part(raw))
            if len(parts) == 2:
                await asyncio.sleep(0.5)  # the client stalls after its first chunk
                assert len(produced) <= 1 + 2 + 1  # taken + max_ahead + the one being made
        return parts

    parts = asyncio.run(slow())
    assert [p.type for p in parts].count("chunk") == 21 and produced == list(range(21))
    engine.shutdown()


def test_model_swap_keeps_running_stream_on_the_old_model() -> None:
    from deploy.models import LoadedModel, ModelInfo
    from deploy.synthetic import SyntheticGenerator

    def loaded(version: str) -> LoadedModel:
        info = ModelInfo("t", "t", version, None, None)
        return LoadedModel(info, lambda: SyntheticGenerator(delay=0.01))

    engine = Engine(loaded("1"), max_streams=2)

    async def run() -> tuple[list, list]:
        old = engine.stream(engine.admit(), GenerateRequest("a", 3))
        first = [decode_part(await old.__anext__())]
        engine.model = loaded("2")  # what the replica's reconfigure does on reload
        first += [decode_part(raw) async for raw in old]
        second = [
            decode_part(raw) async for raw in engine.stream(engine.admit(), GenerateRequest("a", 1))
        ]
        return first, second

    first, second = asyncio.run(run())
    assert first[0].header["model"]["version"] == "1" and first[-1].header["chunks"] == 4
    assert second[0].header["model"]["version"] == "2"
    engine.shutdown()
