"""`omniforcing serve | stream | generate`: the deploy package's commands, plus `start_serve`.

`register(app)` is called by pipeline/cli.py. `start_serve` is the one way to bring the Serve app
up (the CLI and the test fixtures both use it). Route handlers live in deploy/app.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from typing import Any

import typer

DEFAULT_MODEL = "models:/omniforcing-student@champion"


def start_serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_streams: int = 4,
    max_seconds: int = 60,
    address: str | None = None,
    replica_cpus: float = 1.0,
    revision: Any = 0,
    api_key: str | None = None,
    num_cpus: int | None = None,
    replica_gpus: float = 0.0,
    device: str | None = None,
) -> Any:
    """Start (or update) the Serve app; local Ray unless `address`. Returns the app handle."""
    import ray
    from ray import serve

    from deploy.app import APP_NAME, Settings, build_app

    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(address="local", num_cpus=num_cpus, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    settings = Settings(
        max_streams=max(1, math.ceil(max_streams / replicas)),
        max_seconds=max_seconds,
        api_key=api_key,
        device=device,
    )
    app = build_app(model, settings, replicas, replica_cpus, replica_gpus, revision)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def reload_serve(model: str, url: str, timeout_s: float = 600.0, **kwargs: Any) -> dict[str, Any]:
    """Redeploy the running app under a new revision (the alias is resolved again) and return
    `/healthz` of the first replica that answers on it. Serve drains the old replica (its running
    streams finish on the old weights) in the background; this does not wait for that."""
    import threading

    import httpx

    revision, failed = time.time_ns(), []

    def deploy() -> None:  # serve.run returns only once the old replica has drained
        try:
            start_serve(model, revision=revision, **kwargs)
        except Exception as err:  # noqa: BLE001 — reported below
            failed.append(err)

    threading.Thread(target=deploy, daemon=True, name="omniforcing-reload").start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not failed:
        try:
            info = httpx.get(url + "/healthz", timeout=10).json()
            if info.get("revision") == revision:
                return info
        except (httpx.HTTPError, ValueError):
            pass  # a replica starting or stopping; ask again
        time.sleep(0.5)
    reason = f"{type(failed[0]).__name__}: {failed[0]}" if failed else f"no answer in {timeout_s} s"
    raise RuntimeError(f"reload of {model} failed: {reason}")


def serve_cmd(
    model: str = typer.Option(DEFAULT_MODEL, help="models:/name@alias, a bundle dir, synthetic:"),
    host: str = typer.Option("127.0.0.1", help="HTTP bind address."),
    port: int = typer.Option(8000, help="HTTP port."),
    replicas: int = typer.Option(1, min=1, help="Serve replicas (one per GPU on a cluster)."),
    max_streams: int = typer.Option(4, min=1, help="Concurrent streams in total; more get 503."),
    max_seconds: int = typer.Option(60, min=1, help="Longest clip a request may ask for."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: local Ray)."),
    replica_cpus: float = typer.Option(1.0, help="CPUs reserved per replica."),
    replica_gpus: float = typer.Option(0.0, help="GPUs per replica (1 on a GPU cluster)."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if present)."),
    reload: bool = typer.Option(
        False,
        help="Redeploy into the running app (re-resolves the alias); returns once a replica on "
        "the new revision answers, while the old one finishes its running streams.",
    ),
) -> None:
    """Serve the streaming generator over HTTP + WebSocket with a live browser player."""
    url = f"http://{host}:{port}"
    common = dict(host=host, port=port, replicas=replicas, max_streams=max_streams)
    common |= dict(max_seconds=max_seconds, replica_cpus=replica_cpus)
    common |= dict(replica_gpus=replica_gpus, device=device)
    if reload:
        try:
            info = reload_serve(model, url, address=address or "auto", **common)
        except RuntimeError as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(1) from None
        typer.echo(
            f"reloaded: {json.dumps(info['model'])}; reload_error={info['reload_error']} "
            "(the old replica finishes its running streams, then stops)"
        )
        return
    try:
        start_serve(model, address=address, **common)
    except RuntimeError as err:  # Serve's "Deploying application … failed" with a traceback
        typer.echo(f"error: {model} could not be served: {load_failure(err)}", err=True)
        raise typer.Exit(2) from None
    import ray
    from ray import serve

    # Several local Ray clusters may share a machine: say which one `--reload` must target.
    gcs = ray.get_runtime_context().gcs_address
    typer.echo(f"serving {model} at {url}/ (Ray at {gcs}; reload with --reload --address {gcs})")
    # SIGTERM (containers, process managers) stops as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _report(stats: Any, out: str | None) -> None:
    s = stats.summary()
    typer.echo(
        f"time to first chunk {s['ttfc_s'] * 1000:.0f} ms | {s['chunks']} chunks, "
        f"{s['frames']} frames in {s['elapsed_s']:.2f} s | {s['fps']:.1f} FPS | "
        f"real-time factor {s['rtf']:.2f}" + (f" | wrote {out}" if out else "")
    )


def stream_cmd(
    url: str = typer.Option("http://127.0.0.1:8000", help="Server base URL."),
    prompt: str = typer.Option(..., help="Text prompt."),
    seconds: int = typer.Option(5, min=1),
    seed: int = typer.Option(0, min=0),
    out: str | None = typer.Option(None, help="Write the clip here (mp4, H.264 + AAC)."),
    websocket: bool = typer.Option(False, "--websocket", help="Use /v1/stream, not HTTP."),
    api_key: str | None = typer.Option(None, envvar="OMNIFORCING_API_KEY"),
) -> None:
    """Stream a clip from a running server and save it."""
    from deploy.client import ClientError, save_stream, stream_http, stream_ws

    fn = stream_ws if websocket else stream_http
    try:
        stats = save_stream(fn(url, prompt, seconds, seed, api_key=api_key), out)
    except ClientError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    _report(stats, out)


def generate_cmd(
    model: str = typer.Option(DEFAULT_MODEL, help="models:/name@alias, a bundle dir, synthetic:"),
    prompt: str = typer.Option(..., help="Text prompt."),
    seconds: int = typer.Option(5, min=1),
    seed: int = typer.Option(0, min=0),
    out: str | None = typer.Option(None, help="Write the clip here (mp4, H.264 + AAC)."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if present)."),
) -> None:
    """Generate a clip in this process (no server) and save it."""
    from deploy.client import generate_local, save_stream

    with model_errors():
        stats = save_stream(generate_local(model, prompt, seconds, seed, device), out)
    _report(stats, out)


@contextlib.contextmanager
def model_errors() -> Iterator[None]:
    """A model that cannot be loaded (bad bundle, unknown URI) is one line and exit code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:  # BundleError is a ValueError
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(2) from None


def load_failure(err: BaseException) -> str:
    """The one line of a failed Serve deployment that says why the model did not load: the
    replica's BundleError/ValueError, which Serve keeps at the end of a traceback in the
    deployment's status message; else the first line of `err`."""
    from ray import serve

    from deploy.app import APP_NAME

    text = ""
    with contextlib.suppress(Exception):  # no status to read: fall back to the error itself
        app = serve.status().applications[APP_NAME]
        text = "\n".join([app.message, *(d.message for d in app.deployments.values())])
    lines = [ln.strip() for ln in f"{err}\n{text}".splitlines() if ln.strip()]
    for ln in reversed(lines):
        for kind in ("BundleError: ", "FileNotFoundError: ", "ValueError: "):
            if kind in ln:
                return ln[ln.index(kind) + len(kind) :]
    return lines[0] if lines else type(err).__name__


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("stream")(stream_cmd)
    app.command("generate")(generate_cmd)
