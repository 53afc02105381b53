"""Maps a request's `model` to the engine serving it. One base model per server for now; the
multi-LoRA work adds adapters as further names routed to the same engine."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lmq.async_engine import AsyncEngine
from lmq.tokenizer import Tokenizer
from serve.errors import APIError


@dataclass(frozen=True)
class Route:
    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    max_model_len: int
    accepts_images: bool = False


class Router:
    def __init__(self, base: Route) -> None:
        self.base = base
        self.created = int(time.time())
        self._routes = {base.name: base}

    def resolve(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is None:
            raise APIError(404, f"model {model!r} does not exist; served models: {', '.join(self._routes)}",
                           param="model", code="model_not_found")
        return route

    def models(self) -> list[dict]:
        return [{"id": r.name, "object": "model", "created": self.created, "owned_by": "lmq", "root": r.name,
                 "parent": None, "max_model_len": r.max_model_len} for r in self._routes.values()]
