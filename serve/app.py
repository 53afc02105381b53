"""The FastAPI app: OpenAI routes, vLLM's /tokenize and /detokenize, health, ping, version,
metrics, API keys."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import lmq
from serve.adapters_api import AdapterAdmin
from serve.errors import APIError, error_body, install_error_handlers
from serve.metrics import Metrics
from serve.openai_api import chat_job, completion_job, load_images, respond
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from serve.router import Router
from serve.tokenize_api import detokenize, tokenize

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def _gated(path: str) -> bool:
    """Routes behind the API keys: everything that does work for a client. /health, /ping,
    /version and /metrics stay open for probes and scrapers."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class _Gate:
    """Pure ASGI middleware (it never buffers streams): API keys on the gated routes, and the
    status of every gated response counted in the metrics."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], metrics: Metrics) -> None:
        self.app, self.api_keys, self.metrics = app, api_keys, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not _gated(scope["path"]):
            return await self.app(scope, receive, send)
        if self.api_keys and not self._authorized(scope):
            self.metrics.requests.labels("401").inc()
            resp = JSONResponse(error_body(401, "missing or invalid API key: send 'Authorization: Bearer <key>'"),
                                401, headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        return any(hmac.compare_digest(token, k) for k in self.api_keys)


def build_app(router: Router, api_keys: tuple[str, ...] = (), lora_dir: str | None = None) -> FastAPI:
    engine = router.base.engine
    metrics = Metrics(engine.stats, router.base.name, router.base.max_model_len)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()  # requests still running are aborted: finish_reason "abort"

    app = FastAPI(title="lmq", version=lmq.__version__, lifespan=lifespan)
    app.state.router, app.state.metrics = router, metrics
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        if not engine.alive:
            raise APIError(503, "the engine process has stopped")
        return {"status": "ok"}

    @app.get("/ping")
    @app.post("/ping", operation_id="ping_post")
    async def ping() -> dict:  # vLLM's (SageMaker's) name for /health
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": lmq.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": router.models()}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        route = router.resolve(req.model)
        job = chat_job(req, route)
        await load_images(job, route)
        return await respond(job, route, request, metrics, req.stream)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        route = router.resolve(req.model)
        return await respond(completion_job(req, route), route, request, metrics, req.stream)

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict:
        return tokenize(req, router.resolve(req.model) if req.model is not None else router.base)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict:
        return detokenize(req, router.resolve(req.model) if req.model is not None else router.base)

    admin = AdapterAdmin(router, lora_dir)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> Response:
        return PlainTextResponse(await admin.load(req))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> Response:
        return PlainTextResponse(await admin.unload(req))

    app.add_middleware(_Gate, api_keys=api_keys, metrics=metrics)
    return app
