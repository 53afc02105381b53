"""An async client of any OpenAI-compatible server: the models it serves and streamed chat
completions. Leaving a stream early (the stop button cancels the task that reads it) closes the
HTTP response; lmq's server aborts a request whose client hung up (serve/openai_api._sse), so
its KV blocks come back at once."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


class APIRequestError(Exception):
    """The server refused a request; `str()` is a message to show the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def body(self) -> dict:
        body = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.seed is not None:
            body["seed"] = self.seed
        return body


@dataclass
class Delta:
    """What one SSE chunk adds: text, a finish reason, or the usage of the whole answer."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class AnswerStats:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = 0.0
    first_token: float | None = None
    ended: float | None = None

    def line(self) -> str:
        if self.completion_tokens is None:
            return "the server sent no usage for this answer"
        parts = [f"{self.prompt_tokens} prompt tokens, {self.completion_tokens} completion tokens"]
        end = self.ended or time.monotonic()
        if self.first_token is not None:
            # decode speed: tokens after the first over the time after the first
            span = end - self.first_token
            speed = (self.completion_tokens - 1) / span if span > 0 and self.completion_tokens > 1 else 0.0
            parts.append(f"{speed:.1f} tok/s")
            parts.append(f"first token after {self.first_token - self.started:.2f} s")
        return ", ".join(parts)


def error_message(status: int, body: bytes) -> str:
    """The server's OpenAI error JSON ({"error": {"message", "param", ...}}) as one line."""
    try:
        err = json.loads(body)["error"]
        message = err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:500] or "no details"
    hint = {401: "unauthorized", 404: "not found", 429: "server busy", 503: "unavailable"}.get(status)
    return f"the server refused the request ({status}{' ' + hint if hint else ''}): {message}"


class ChatClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        """base_url: the API root, e.g. http://127.0.0.1:8000/v1."""
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect fast, but let a long answer take its time between chunks
        self.timeout = httpx.Timeout(timeout, connect=10.0)

    async def models(self) -> list[str]:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            try:
                resp = await http.get(f"{self.base_url}/models", headers=self.headers)
            except httpx.HTTPError as e:
                raise APIRequestError(0, f"cannot reach {self.base_url}: {e}") from None
        if resp.status_code != 200:
            raise APIRequestError(resp.status_code, error_message(resp.status_code, resp.content))
        return [m["id"] for m in resp.json()["data"]]

    async def stream_chat(self, model: str, messages: list[dict], sampling: Sampling) -> AsyncIterator[Delta]:
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **sampling.body()}
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            try:
                async with http.stream("POST", f"{self.base_url}/chat/completions", json=body,
                                       headers=self.headers) as resp:
                    if resp.status_code != 200:
                        raise APIRequestError(resp.status_code, error_message(resp.status_code, await resp.aread()))
                    async for line in resp.aiter_lines():
                        if delta := _parse_sse(line):
                            yield delta
            except httpx.HTTPError as e:
                raise APIRequestError(0, f"the connection to {self.base_url} failed: {e}") from None


def _parse_sse(line: str) -> Delta | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:  # some servers report a failure inside the stream
        raise APIRequestError(500, error_message(500, data.encode()))
    delta = Delta()
    if usage := chunk.get("usage"):
        delta.prompt_tokens, delta.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    for choice in chunk.get("choices") or []:
        delta.text += (choice.get("delta") or {}).get("content") or ""
        delta.finish_reason = choice.get("finish_reason") or delta.finish_reason
    return delta
