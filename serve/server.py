"""`lmq serve`: build the engine, the router and the app, then run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import gc
import signal
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from lmq.async_engine import AsyncEngine
from lmq.config import EngineConfig
from lmq.tool_parsers import PARSERS
from serve.app import build_app
from serve.router import Route, Router
from vision.inputs import ImageInputs
from vision.media import MediaConfig


def make_app(config: EngineConfig, served_model_name: str | None = None, api_keys: tuple[str, ...] = (),
             max_queue_len: int | None = None, adapters: dict[str, str] | None = None,
             lora_dir: str | None = None, media: MediaConfig | None = None,
             limit_images_per_prompt: int = 8, tool_call_parser: str | None = None) -> FastAPI:
    """Starts the engine process (which loads the weights and the vision encoders; this process
    loads only the tokenizer and the image preprocessor) and returns once it is ready.
    adapters: name -> peft folder, each served as a model of its own (`model: name`). media:
    which image URLs requests may name (vision models). tool_call_parser: the format of the
    model's tool calls (lmq.tool_parsers.PARSERS); None: chosen from its chat template."""
    if limit_images_per_prompt < 0:
        raise ValueError(f"limit_images_per_prompt={limit_images_per_prompt} is invalid: must be >= 0")
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise ValueError(f"tool_call_parser={tool_call_parser!r} is invalid: must be one of {', '.join(PARSERS)}")
    images = ImageInputs(config.model, media) if config.model.vision is not None else None
    engine = AsyncEngine(config, max_queue_len=max_queue_len)
    try:
        for adapter, path in (adapters or {}).items():
            engine.call_blocking("load_adapter", adapter, path)
    except BaseException:
        engine.shutdown()
        raise
    name = served_model_name or Path(config.model.path).name
    router = Router(Route(name, engine, engine.tokenizer, engine.config.scheduler.max_model_len, images,
                          limit_images_per_prompt, tool_call_parser=tool_call_parser))
    for adapter, path in (adapters or {}).items():
        router.add_adapter(adapter, path)
    return build_app(router, api_keys, lora_dir)


class _Server(uvicorn.Server):
    """On SIGINT/SIGTERM, first abort what the engine is running: every open stream then ends
    with finish_reason "abort" and [DONE], and uvicorn's graceful shutdown has nothing to wait for."""

    def handle_exit(self, sig: int, frame: object) -> None:
        self.config.app.state.router.base.engine.shutdown()
        super().handle_exit(sig, frame)


def _server(app: FastAPI, host: str, port: int) -> _Server:
    return _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))


def run(app: FastAPI, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then return normally (exit status 0)."""
    name = app.state.router.base.name
    print(f"lmq: serving {name!r} at http://{host}:{port}/v1 (OpenAI API), /health, /metrics", flush=True)
    if ui_path := getattr(app.state, "ui_path", None):
        print(f"lmq: web chat at http://{host}:{port}{ui_path}", flush=True)
    # uvicorn handles the signal, then re-raises it to the handler it found: make that a no-op,
    # so a requested shutdown is a clean exit rather than KeyboardInterrupt / death by SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    freeze_startup_objects()
    _server(app, host, port).run()


def freeze_startup_objects() -> None:
    """Move what start-up built (torch, transformers, the tokenizer, FastAPI: ~380,000 objects)
    out of the cyclic collector's sight, as the engine process does. Otherwise every full
    collection, which per-request garbage triggers every few seconds under load, walks all of
    them with the GIL held: 210 ms on the development CPU, 260-370 ms stalls of every stream at
    once on an H100 machine (BENCHMARKS.md, "Server under load"). Only for a process that is
    the server: `run` calls it, not `make_app` (tests and notebooks embed the app)."""
    gc.collect()
    gc.freeze()


class BackgroundServer:
    """The app on uvicorn in a background thread, on a free loopback port (tests, benchmarks,
    embedding in a notebook). `stop()` shuts it down like SIGTERM does."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket
        import threading
        import time

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.app, self.url = app, f"http://{host}:{port}"
        self.server = _server(app, host, port)
        self.thread = threading.Thread(target=self.server.run, name="lmq-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.app.state.router.base.engine.shutdown()
        self.server.should_exit = True
        self.thread.join(30)
