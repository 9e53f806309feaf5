"""Integration tests: a real Ray Serve app (local Ray) serving the tiny student from a real MLflow
registry (`models:/omniforcing-student@champion`) over real HTTP and WebSocket. One app for the
whole module; the reload test runs last because it moves the alias to a new version."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from deploy.client import ClientError, generate_local, save_stream, stream_http, stream_ws
from deploy.mp4writer import probe
from deploy.protocol import decode_part
from tests.fixtures.serve import promote_bundle, running_serve, save_tiny_bundle, wait_for

KEY = "test-key-123"
AUTH = {"X-API-Key": KEY}
MAX_STREAMS = 8
# The server's cap, also the length of the streams a test inspects, drops or reloads under: the
# tiny model makes a second of content in ≈ 25 ms, and the Serve proxy pulls parts from the replica
# as fast as they come (it does not wait for the client), so a 120 s stream can end within seconds,
# before a test has looked at it. 3600 s takes ≥ 90 s; such streams are always cancelled.
MAX_SECONDS = 3600


MODEL = "models:/omniforcing-student@champion"


@pytest.fixture(scope="module")
def registry(mlflow_server: str, tiny_bundle_dir):
    """MLflow env for this module (replicas inherit it) and version 1 promoted to @champion."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        mp.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
        first = promote_bundle(mlflow_server, tiny_bundle_dir)
        yield mlflow_server, first


@pytest.fixture(scope="module")
def server(registry, ray_local):
    with running_serve(MODEL, max_streams=MAX_STREAMS, max_seconds=MAX_SECONDS, api_key=KEY) as url:
        yield url


def _stats(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=10).json()


def _replicas() -> dict[str, int]:
    """Replica states of the served deployment ({"RUNNING": 1} when nothing is changing)."""
    from ray import serve

    from deploy.app import APP_NAME

    (deployment,) = serve.status().applications[APP_NAME].deployments.values()
    return {str(k): v for k, v in deployment.replica_states.items() if v}


def _idle(url: str, before: dict) -> bool:
    now = _stats(url)
    keys = ("active_streams", "live_generators")
    return all(now[k] == before[k] for k in keys)


def test_health_model_info_and_api_key(server: str) -> None:
    health = _stats(server)
    assert health["status"] == "ok" and health["max_streams"] == MAX_STREAMS
    r = httpx.get(server + "/v1/model")
    assert r.status_code == 401 and r.json()["error"]["field"] == "api_key"
    r = httpx.get(server + "/v1/model", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401
    info = httpx.get(server + "/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["name"] == "omniforcing-student" and info["preset"] == "tiny"
    assert info["alias"] == "champion" and info["version"] == "1"
    r = httpx.post(server + "/v1/generate", json={"prompt": "a", "seconds": 1})
    assert r.status_code == 401
    assert "<canvas" in httpx.get(server + "/").text


def test_stream_end_to_end_writes_requested_clip(server: str, tmp_path) -> None:
    out = tmp_path / "clip.mp4"
    stats = save_stream(stream_http(server, "a red ball", 2, seed=3, api_key=KEY), out)
    assert stats.chunks == 3 and stats.frames == 49 and not stats.cancelled
    assert 0 < stats.ttfc_s < stats.elapsed_s
    assert stats.chunk_times_s == sorted(stats.chunk_times_s)
    assert stats.model["preset"] == "tiny"
    info = probe(out)
    assert info["frames"] == 1 + 24 * 2 and info["fps"] == 24.0
    assert info["sample_rate"] == 16000 and info["channels"] == 1
    assert abs(info["video_s"] - 49 / 24) < 1e-6
    assert abs(info["audio_s"] - (640 + 32000) / 16000) < 1024 / 16000  # AAC frame padding


def test_stream_command_writes_clip(server: str, tmp_path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from deploy.cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "cli.mp4"
    args = ["stream", "--url", server, "--prompt", "a ball", "--seconds", "1", "--out", str(out)]
    monkeypatch.setenv("OMNIFORCING_API_KEY", KEY)
    result = CliRunner().invoke(app, [*args, "--websocket"])
    assert result.exit_code == 0, result.output
    assert "time to first chunk" in result.output and probe(out)["frames"] == 25
    monkeypatch.setenv("OMNIFORCING_API_KEY", "wrong")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "401" in result.output


def assert_same_frames(got: np.ndarray, want: np.ndarray) -> None:
    """The same frames up to rounding: the replica runs torch on one thread, the test on
    several, and a float sum in another order can flip a pixel's rounding by one level (seen on
    an AMD EPYC box: 1 pixel of 73,728). Other weights or seeds differ everywhere."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, (diff.max(), (diff > 0).sum())


def test_websocket_stream_matches_in_process_generation(server: str, tiny_bundle_dir) -> None:
    remote = list(stream_ws(server, "a green ball", 1, seed=5, api_key=KEY))
    local = list(generate_local(str(tiny_bundle_dir), "a green ball", 1, seed=5))
    assert [p.type for p in remote] == ["start", "chunk", "chunk", "end"]
    for r, loc in zip(remote[1:3], local[1:3], strict=True):
        assert_same_frames(r.frames, loc.frames)
        # Bit-equal only at equal torch thread counts (the replica's differs from the test's).
        np.testing.assert_allclose(r.audio, loc.audio, rtol=0, atol=1e-5)


BAD = [
    (b"{not json", 400, None),
    (b'{"seconds": 1}', 422, "prompt"),
    (b'{"prompt": "", "seconds": 1}', 422, "prompt"),
    (json.dumps({"prompt": "x" * 3000, "seconds": 1}).encode(), 422, "prompt"),
    (b'{"prompt": "a", "seconds": 0}', 422, "seconds"),
    (json.dumps({"prompt": "a", "seconds": MAX_SECONDS + 1}).encode(), 422, "seconds"),
    (b'{"prompt": "a", "seconds": "one"}', 422, "seconds"),
    (b'{"prompt": ["a"], "seconds": 1}', 422, "prompt"),
    (b'{"prompt": "a", "seconds": 1, "seed": 1.5}', 422, "seed"),
    (b'{"prompt": "a", "seconds": 1, "steps": 4}', 422, "steps"),
    (b"x" * 70000, 413, None),
]


def test_bad_requests_get_4xx_naming_the_field(server: str) -> None:
    for body, status, field in BAD:
        r = httpx.post(server + "/v1/generate", content=body, headers=AUTH, timeout=30)
        assert r.status_code == status, (body[:60], r.text)
        assert r.json()["error"]["field"] == field, (body[:60], r.text)
    # The same validation over the WebSocket: an error part, then the socket is closed.
    with connect(server.replace("http", "ws") + "/v1/stream", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"prompt": "a", "seconds": -2}))
        part = decode_part(ws.recv(timeout=30))
        assert part.type == "error" and part.header["error"]["field"] == "seconds"
    parts = list(stream_ws(server, "a", 1, api_key="wrong"))
    assert [p.type for p in parts] == ["error"] and parts[0].header["error"]["field"] == "api_key"
    with pytest.raises(ClientError) as info:
        save_stream(stream_http(server, "a", 1, api_key="wrong"), None)
    assert info.value.status == 401
    health = _stats(server)
    assert health["status"] == "ok" and health["active_streams"] == 0


def test_eight_concurrent_streams_complete_and_ninth_gets_503(server: str) -> None:
    results: list = [None] * MAX_STREAMS

    def run(i: int) -> None:
        try:
            # 30 s clips (≥ 0.75 s each, 8 share one replica), so that all 8 overlap even when
            # admission is staggered by load.
            results[i] = save_stream(stream_http(server, "a ball", 30, seed=i, api_key=KEY), None)
        except Exception as err:  # noqa: BLE001 — reported by the assertion below
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(MAX_STREAMS)]
    for t in threads:
        t.start()
    wait_for(lambda: _stats(server)["active_streams"] == MAX_STREAMS, 60, "8 active streams")
    t0 = time.monotonic()
    r = httpx.post(server + "/v1/generate", json={"prompt": "a", "seconds": 1}, headers=AUTH)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
    assert "overloaded" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5  # refused at once, never queued behind the others
    with connect(server.replace("http", "ws") + "/v1/stream", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"prompt": "a", "seconds": 1}))
        part = decode_part(ws.recv(timeout=30))
        assert part.type == "error" and part.header["error"]["status"] == 503
    for t in threads:
        t.join(timeout=180)
    assert all(not isinstance(s, Exception) for s in results), results
    assert [s.chunks for s in results] == [31] * MAX_STREAMS
    wait_for(lambda: _stats(server)["active_streams"] == 0, 30, "streams to finish")


def test_disconnect_mid_stream_frees_the_session(server: str) -> None:
    before = _stats(server)
    # HTTP: read the first chunk of a long clip, then drop the connection.
    parts = stream_http(server, "a ball", MAX_SECONDS, api_key=KEY)
    head = [next(parts), next(parts)]
    assert [p.type for p in head] == ["start", "chunk"], head[-1].header
    assert _stats(server)["active_streams"] == before["active_streams"] + 1
    parts.close()  # leaves the HTTP stream: the connection is dropped
    t0 = time.monotonic()
    wait_for(lambda: _idle(server, before), 20, "HTTP session to be freed")
    http_free_s = time.monotonic() - t0
    # WebSocket: receive one chunk, then close the socket abruptly.
    with connect(server.replace("http", "ws") + "/v1/stream", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"prompt": "a ball", "seconds": MAX_SECONDS}))
        while decode_part(ws.recv(timeout=60)).type != "chunk":
            pass
        assert _stats(server)["live_generators"] == before["live_generators"] + 1
    wait_for(lambda: _idle(server, before), 20, "WebSocket session to be freed")
    # The cancel message ends a stream early and also frees it.
    parts = list(stream_ws(server, "a ball", MAX_SECONDS, api_key=KEY, cancel_after=1))
    assert parts[-1].type == "end" and parts[-1].header["cancelled"] is True
    assert len([p for p in parts if p.type == "chunk"]) < MAX_SECONDS + 1
    wait_for(lambda: _idle(server, before), 20, "cancelled session to be freed")
    assert http_free_s < 10


def test_alias_move_and_reload_switch_version_while_running_stream_stays_on_old(
    server: str, registry, tiny_bundle_dir, tmp_path
) -> None:
    from deploy.cli import reload_serve

    tracking_uri, first = registry
    old = httpx.get(server + "/v1/model", headers=AUTH).json()
    assert old["version"] == first["version"]
    second = promote_bundle(tracking_uri, save_tiny_bundle(tmp_path / "v2", seed=1))
    assert second["version"] != first["version"]
    # Moving the alias alone changes nothing until a reload (what `serve --reload` does).
    assert httpx.get(server + "/v1/model", headers=AUTH).json()["version"] == old["version"]
    # A long stream, held after its first chunk while the reload happens.
    running = stream_http(server, "a red ball", MAX_SECONDS, seed=1, api_key=KEY)
    parts = [next(running), next(running)]
    assert [p.type for p in parts] == ["start", "chunk"]
    assert _stats(server)["active_streams"] == 1
    # `serve --reload`: Serve starts a replica on the new revision and drains the old one, whose
    # running streams go on; `reload_serve` returns once the new revision answers /healthz.
    port = int(server.rsplit(":", 1)[1])
    settings = {"max_streams": MAX_STREAMS, "max_seconds": MAX_SECONDS, "api_key": KEY}
    info = reload_serve(MODEL, server, timeout_s=120, port=port, replica_cpus=0.5, **settings)
    assert info["model"]["version"] == second["version"]
    assert httpx.get(server + "/v1/model", headers=AUTH).json()["version"] == second["version"]
    # The stream admitted before the reload goes on, on the old weights: its chunks are those of
    # the version-1 bundle generated in-process (same prompt, seed and length).
    parts += [next(running) for _ in range(5)]
    assert parts[0].header["model"]["version"] == old["version"]
    assert [p.type for p in parts[1:]] == ["chunk"] * 6
    local = generate_local(str(tiny_bundle_dir), "a red ball", MAX_SECONDS, seed=1)
    for r, loc in zip(parts[1:], itertools.islice(local, 1, 7), strict=True):
        assert_same_frames(r.frames, loc.frames)
        np.testing.assert_allclose(r.audio, loc.audio, rtol=0, atol=1e-5)
    local.close()
    assert _replicas() == {"RUNNING": 1, "STOPPING": 1}  # the old one drains: stream running
    running.close()  # the client leaves: the stream is cancelled, the old replica can stop
    wait_for(lambda: _replicas() == {"RUNNING": 1}, 120, "the old replica to drain and stop")
    new_parts = list(stream_http(server, "a red ball", 1, seed=1, api_key=KEY))
    assert new_parts[0].header["model"]["version"] == second["version"]
    assert not np.array_equal(new_parts[2].audio, parts[2].audio)  # other weights, same seed
