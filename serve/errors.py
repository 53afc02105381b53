"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Every validation failure is a 400 (never FastAPI's 422) whose message names the field, the
limit and the value."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmq")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code if code is not None else status}}


_PARAM = re.compile(r"([A-Za-z_]\w*(?:\[[^\]]*\])*)[=:]")  # `max_tokens=`, `logit_bias[5]=`, `logit_bias:`


def bad_value(err: ValueError) -> APIError:
    """lmq's ValueErrors start with `field=value is invalid ...` (or `field: ...`): that names
    the param, `logit_bias[5]` included."""
    m = _PARAM.match(str(err))
    return APIError(400, str(err), param=m.group(1) if m else None)


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _field(loc: tuple) -> str:
    """pydantic's loc ("body", "messages", 0, "content") as `messages[0].content`, without the
    tags it adds inside unions ("list[ContentPart]", "ImageURL")."""
    out = ""
    for i, x in enumerate(loc):
        tag = isinstance(x, str) and (x in _UNION_TAGS or "[" in x or x[:1].isupper())
        if (x == "body" and not out) or (tag and i < len(loc) - 1):
            continue
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out or "body"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Unknown fields first, every one of them named; then up to 5 invalid values."""
    errors = exc.errors()
    unknown = [_field(e.get("loc", ())) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        return (f"unknown field{'s' if len(unknown) > 1 else ''} {names}: refused rather than ignored "
                "(the README's HTTP API lists the fields lmq serves)", unknown[0])
    parts, param = [], None
    for e in errors:
        field = _field(e.get("loc", ()))
        param = param or field
        value = e.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else "…"
        parts.append(f"{field}: {e.get('msg')} (got {shown})")
    return "; ".join(parts[:5]) or "invalid request body", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("lmq: unexpected error while serving a request")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), 500)
