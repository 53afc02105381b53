"""`lmq ui`: the web chat alone, served by its own uvicorn, against any OpenAI-compatible server
(lmq's, vLLM's, ...). Every browser session uses the one --api-key given here."""

from __future__ import annotations

import signal

import gradio as gr
import uvicorn
from fastapi import FastAPI

from ui.app import THEME, build_app
from ui.client import ChatClient


def build_standalone(api_url: str, api_key: str | None = None) -> FastAPI:
    demo = build_app(lambda _request: ChatClient(api_url, api_key))
    return gr.mount_gradio_app(FastAPI(title="lmq ui"), demo, "/", ssr_mode=False, theme=THEME, footer_links=[])


def run_ui(api_url: str, api_key: str | None, host: str, port: int) -> None:
    app = build_standalone(api_url, api_key)
    print(f"lmq: web chat for {api_url} at http://{host}:{port}/", flush=True)
    # As `lmq serve` does: uvicorn re-raises the signal it handled to the handler it found;
    # a no-op makes a requested stop a clean exit (status 0).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # a page left open keeps its event stream: do not wait for it on SIGINT/SIGTERM
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
