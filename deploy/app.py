"""The Ray Serve application: FastAPI routes over the per-replica `Engine`.

Routes: `POST /v1/generate` (chunked stream of framed parts, see deploy/protocol.py),
`GET /v1/stream` (WebSocket, same parts + cancel), `GET /` (live player page), `GET /healthz`,
`GET /v1/model`. Errors are JSON `{"error": {"field", "message", "status"}}`. The deployment's
`user_config` carries the model URI and a revision. `omniforcing serve --reload` redeploys with a
new revision: Serve starts a replica on it and drains the old one, whose running streams finish
on the old weights; a config-file update of `user_config` alone reloads in place (`reconfigure`),
the running streams keeping their old generator either way. `/healthz` reports the revision, so a
caller can tell when the new one answers. Generation, admission and cache freeing: deploy/engine.py.
"""

import asyncio
import hmac
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.websockets import WebSocketDisconnect

from deploy.engine import Engine, Overloaded
from deploy.models import load_model
from deploy.protocol import MAX_BODY_BYTES, MEDIA_TYPE, RequestError, encode_part, parse_request

log = logging.getLogger("omniforcing.serve")
API_KEY_ENV = "OMNIFORCING_API_KEY"
DEPLOYMENT = "OmniForcing"
APP_NAME = "omniforcing"
_PAGE = Path(__file__).with_name("page.html")
# Environment the replicas need (they may run on other nodes): registry access and the API key.
_PASS_ENV = {
    API_KEY_ENV,
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
}


@dataclass(frozen=True)
class Settings:
    """Per-replica limits; `max_streams` is per replica (the CLI divides the total)."""

    max_streams: int = 4
    max_seconds: int = 60
    max_body: int = MAX_BODY_BYTES
    api_key: str | None = None  # falls back to $OMNIFORCING_API_KEY in the replica
    retry_after_s: int = 2
    device: str | None = None


api = FastAPI(title="OmniForcing", docs_url=None, redoc_url=None)


@api.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    headers = {"Retry-After": "2"} if err.status == 503 else None
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


class _PartStream(StreamingResponse):
    """A StreamingResponse that ends only when its parts end or the request is cancelled.

    Starlette's own, under ASGI spec < 2.4 (what Serve's replicas get), also ends the response
    when `receive()` yields `http.disconnect`; in CI a stream started just after eight others
    ended was cut after its first part that way (POST 200 in 20 ms, the client still reading).
    A client that really leaves is still noticed: Serve's proxy cancels the replica's request,
    and the engine's `finally` frees the session (tests/test_serve.py times it)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.stream_response(send)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it grows past `limit` instead of buffering it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, None, f"body of {declared} bytes exceeds {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RequestError(413, None, f"body exceeds {limit} bytes")
    return bytes(body)


async def _watch(ws: WebSocket, cancel: asyncio.Event) -> None:
    """Client → server messages during a stream: {"type": "cancel"} or a disconnect end it."""
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if _is_cancel(msg.get("text")):
                break
    except Exception:  # noqa: BLE001 — any receive failure means the client is gone
        pass
    cancel.set()


def _is_cancel(text: str | None) -> bool:
    try:
        obj = json.loads(text) if text else None
    except json.JSONDecodeError:
        return False  # other messages are ignored, not fatal to the stream
    return isinstance(obj, dict) and obj.get("type") == "cancel"


@serve.deployment(name=DEPLOYMENT, graceful_shutdown_timeout_s=600, health_check_period_s=2)
@serve.ingress(api)
class OmniForcingServer:
    def __init__(self, settings: dict[str, Any], model: str | None = None) -> None:
        self.settings = Settings(**settings)
        self.api_key = self.settings.api_key or os.environ.get(API_KEY_ENV) or None
        self.revision: Any = None
        self.reload_error: str | None = None
        self.engine = Engine(load_model(model, self.settings.device), self.settings.max_streams)
        self.uri = model

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on deploy and on every user_config change (alias moved → reload)."""
        uri, revision = user_config["model"], user_config.get("revision")
        first = self.revision is None and uri == self.uri  # __init__ already loaded this one
        if first or (uri, revision) == (self.uri, self.revision):
            self.revision = revision
            return
        try:
            # Running streams hold a reference to the old LoadedModel and finish on it.
            self.engine.model = load_model(uri, self.settings.device)
            self.uri, self.revision, self.reload_error = uri, revision, None
            log.info("reloaded %s -> version %s", uri, self.engine.model.info.version)
        except Exception as err:  # keep serving the old version rather than dropping streams
            self.reload_error = f"{type(err).__name__}: {err}"
            log.exception("reload of %s failed; still serving the previous version", uri)

    def check_health(self) -> None:
        if self.engine.model is None:
            raise RuntimeError("no model loaded")

    # -- helpers -------------------------------------------------------------------------------
    def _authorise(self, headers: Any, query: Any) -> None:
        if not self.api_key:
            return
        bearer = headers.get("authorization", "")
        given = headers.get("x-api-key") or query.get("key") or bearer.removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError(401, "api_key", f"missing or wrong API key (${API_KEY_ENV})")

    def _admit(self) -> str:
        try:
            return self.engine.admit()
        except Overloaded as err:
            raise RequestError(503, None, f"overloaded: {err}; retry later") from None

    # -- routes --------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        info = self.engine.model.info.to_json()
        return {
            "status": "ok",
            "model": info,
            "reload_error": self.reload_error,
            "revision": self.revision,
            "pid": os.getpid(),  # which replica process answered (ops; the replica-death test)
            **self.engine.stats(),
        }

    @api.get("/v1/model")
    def model_info(self, request: Request) -> dict[str, Any]:
        self._authorise(request.headers, request.query_params)
        return self.engine.model.info.to_json()

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> StreamingResponse:
        self._authorise(request.headers, request.query_params)
        req = parse_request(
            await _read_body(request, self.settings.max_body), self.settings.max_seconds
        )
        sid = self._admit()  # a slot whose stream never starts is reclaimed by the engine
        parts = self.engine.stream(sid, req)
        headers = {"X-Stream-Id": sid, "Cache-Control": "no-store"}
        return _PartStream(parts, media_type=MEDIA_TYPE, headers=headers)

    @api.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            self._authorise(ws.headers, ws.query_params)
            raw = await asyncio.wait_for(ws.receive_text(), timeout=30)
            req = parse_request(raw.encode(), self.settings.max_seconds, self.settings.max_body)
            sid = self._admit()
        except RequestError as err:
            await ws.send_bytes(encode_part({"type": "error", **err.to_json()}))
            await ws.close(code=1013 if err.status == 503 else 1008, reason=err.message[:120])
            return
        except (WebSocketDisconnect, TimeoutError):
            return
        cancel = asyncio.Event()
        watcher = asyncio.create_task(_watch(ws, cancel))
        parts = self.engine.stream(sid, req, cancel)
        try:
            async for part in parts:
                await ws.send_bytes(part)
            await ws.close()
        except (WebSocketDisconnect, RuntimeError):
            cancel.set()  # the socket went away while sending
        finally:
            watcher.cancel()
            await parts.aclose()  # stops the worker now, not when the generator is collected


def build_app(
    model: str,
    settings: Settings,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
    revision: Any = 0,
) -> Any:
    """The bound Serve application (pass it to `serve.run`)."""
    actor: dict[str, Any] = {"num_cpus": replica_cpus, "num_gpus": replica_gpus}
    env = {k: v for k, v in os.environ.items() if k in _PASS_ENV or k.startswith("AWS_")}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    deployment = OmniForcingServer.options(
        num_replicas=replicas,
        # Above the stream limit so that excess requests reach the replica and get a 503
        # from `Engine.admit` instead of queueing in the proxy.
        max_ongoing_requests=settings.max_streams + 16,
        ray_actor_options=actor,
        user_config={"model": model, "revision": revision},
    )
    return deployment.bind(asdict(settings), model)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point (`import_path: deploy.app:app_builder`, e.g. in a RayService):
    Serve passes the config's `args` mapping as the one argument."""
    allowed = {"model", "replicas", "max_streams", "max_seconds", "replica_cpus", "replica_gpus"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"app_builder args: unknown key(s) {unknown}; allowed {sorted(allowed)}")
    replicas = int(args.get("replicas", 1))
    settings = Settings(
        max_streams=max(1, int(args.get("max_streams", 4)) // replicas),
        max_seconds=int(args.get("max_seconds", 60)),
        api_key=os.environ.get("OMNIFORCING_API_KEY"),
    )
    return build_app(
        str(args.get("model", "models:/omniforcing-student@champion")),
        settings,
        replicas=replicas,
        replica_cpus=float(args.get("replica_cpus", 1.0)),
        replica_gpus=float(args.get("replica_gpus", 0.0)),
    )
