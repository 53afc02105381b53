"""`lmq ui`: the web chat alone, served by its own uvicorn, against any OpenAI-compatible server
(lmq's, vLLM's, ...). Every browser session uses the one --api-key given here."""

from __future__ import annotations

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
    uvicorn.run(app, host=host, port=port, log_level="warning")
