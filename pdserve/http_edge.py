"""The OpenAI-compatible HTTP edge and the live dashboard: FastAPI on uvicorn, in the gRPC gateway's
process and event loop, over the same ``FrontDoor`` (one code path for validation, placement,
rejection and cancellation).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``pdserve.openai_api``), ``GET
/v1/models``, ``GET /health`` (the gRPC health service's truth: 200 SERVING / 503 NOT_SERVING), ``GET /``
(the dashboard) and ``GET /dashboard.json``. Binds 127.0.0.1 by default; a non-loopback bind needs
TLS and a bearer token, as gRPC does (``check_exposure``). With a token, every route but ``/health``
and the dashboard's static files needs ``Authorization: Bearer <token>``. Every error body is OpenAI's
shape with a short message of ours: no traceback, no exception text.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pdserve import openai_api
from pdserve.dashboard import STATIC, Dashboard, static_file
from pdserve.frontdoor import FrontDoor, ServerOptions, check_exposure
from pdserve.validate import shown

log = logging.getLogger("pdserve.http")
OPEN_PATHS = {"/health", *STATIC}  # no token needed: health, and the dashboard's static files


def build_app(door: FrontDoor, store_capacity: dict[str, int] | None = None) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)  # no docs: no CDN assets
    dash, created = Dashboard(door, store_capacity or {}), int(time.time())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await openai_api.handle(request, door, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai_api.handle(request, door, chat=False)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [openai_api.model_card(door, created)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        if name != door.limits.model:
            return openai_api.unknown_model(name)
        return JSONResponse(openai_api.model_card(door, created))

    @app.get("/health")
    async def health() -> Response:
        ok = door.serving
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, 200 if ok else 503)

    @app.get("/dashboard.json")
    async def dashboard_json() -> Response:
        try:
            return JSONResponse(await dash.snapshot(), headers={"Cache-Control": "no-store"})
        except Exception:  # noqa: BLE001 - the cluster's text is not for clients
            log.exception("dashboard snapshot failed")
            return openai_api.error_response(503, "cluster status unavailable right now; retry",
                                             "service_unavailable_error")

    for path, (name, media) in STATIC.items():
        app.add_api_route(path, _static(name, media), methods=["GET"], include_in_schema=False)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        what = "no such route" if exc.status_code == 404 else "method not allowed" if exc.status_code == 405 else \
            "bad request"
        return openai_api.error_response(exc.status_code, f"{what}: {request.method} {shown(request.url.path)}")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return openai_api.error_response(500, "internal error on this request; see the server log", "internal_error")

    return app


def _static(name: str, media: str):
    body = static_file(name)  # read once: package data never changes while serving

    async def serve() -> Response:
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

    return serve


class BearerAuth:
    """ASGI middleware: ``Authorization: Bearer <token>`` on every route but ``OPEN_PATHS`` (pure ASGI,
    so streaming responses still notice a client's disconnect)."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                resp = openai_api.error_response(401, "authorization: a valid bearer token is required",
                                                 "authentication_error", code="invalid_api_key")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # pdserve's server process owns SIGTERM / SIGINT
        yield


@dataclass
class HttpRunning:
    server: uvicorn.Server
    task: asyncio.Task
    port: int

    async def stop(self, grace_s: float = 3.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, grace_s + 2)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self.task.cancel()


async def start_http(door: FrontDoor, opts: ServerOptions, port: int,
                     store_capacity: dict[str, int] | None = None) -> HttpRunning:
    """Binds ``opts.host:port`` (0 = a free port) and serves on the running event loop."""
    check_exposure(opts)
    app = build_app(door, store_capacity)
    asgi = BearerAuth(app, opts.auth_token) if opts.auth_token else app
    config = uvicorn.Config(asgi, host=opts.host, port=port, lifespan="off", log_level="warning", access_log=False,
                            ssl_certfile=opts.tls_cert or None, ssl_keyfile=opts.tls_key or None,
                            timeout_graceful_shutdown=3, h11_max_incomplete_event_size=64 * 1024)
    host = opts.host.strip("[]")
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (without it a
    # keep-alive client's next request waited ~40 ms on Nagle + delayed ACK)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # its startup error
            raise RuntimeError(f"the HTTP server on {opts.host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    return HttpRunning(server, task, sock.getsockname()[1])
