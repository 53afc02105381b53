"""The chat mounted on lmq's own server at /ui (`lmq serve --ui`).

The page talks to the server's own /v1 API over loopback HTTP, exactly like any other client,
so the API keys, the queue limit and the metrics apply to it unchanged. With --api-keys the page
asks for a login: any user name, an API key as the password; that user's requests then carry
that key (a user name stays bound to the key it first logged in with, so one name never borrows
another key).
"""

from __future__ import annotations

import hmac
import threading

import gradio as gr
from fastapi import FastAPI

from ui.app import THEME, build_app
from ui.client import ChatClient

UI_PATH = "/ui"


class KeyRing:
    """Checks logins against the server's API keys and remembers which key each user holds."""

    def __init__(self, api_keys: tuple[str, ...]) -> None:
        self.api_keys = api_keys
        self._by_user: dict[str, str] = {}
        self._lock = threading.Lock()  # Gradio checks logins on worker threads

    def login(self, username: str, password: str) -> bool:
        if not any(hmac.compare_digest(password, k) for k in self.api_keys):
            return False
        with self._lock:
            bound = self._by_user.setdefault(username, password)
        return hmac.compare_digest(bound, password)

    def key_for(self, username: str | None) -> str | None:
        with self._lock:
            return self._by_user.get(username or "")


def _loopback_url(request: gr.Request) -> str:
    """The API root of the server this page was served by: the request's own local address."""
    raw = request.request
    host, port = raw.scope["server"] if raw is not None and raw.scope.get("server") else ("127.0.0.1", 8000)
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


def mount_ui(app: FastAPI, api_keys: tuple[str, ...] = (), path: str = UI_PATH) -> FastAPI:
    keys = KeyRing(api_keys)

    def client_for(request: gr.Request) -> ChatClient:
        return ChatClient(_loopback_url(request), keys.key_for(request.username) if api_keys else None)

    demo = build_app(client_for)
    app.state.ui_path = path
    return gr.mount_gradio_app(app, demo, path, auth=keys.login if api_keys else None,
                               auth_message="Log in with any user name and one of the server's API keys as the "
                                            "password.", ssr_mode=False, theme=THEME, footer_links=[])
