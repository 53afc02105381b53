"""Maps a request's `model` to the engine serving it and the adapter to apply: the base model's
served name routes to the base model, each loaded adapter's name to that adapter on the same
engine."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from lmq.async_engine import AsyncEngine
from lmq.tokenizer import Tokenizer
from serve.errors import APIError
from vision.inputs import ImageInputs


@dataclass(frozen=True)
class Route:
    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    max_model_len: int
    images: ImageInputs | None = None  # None: a text-only model, which refuses images
    limit_images_per_prompt: int = 8
    adapter: str | None = None  # None: the base model
    root: str | None = None  # where the weights came from
    tool_call_parser: str | None = None  # --tool-call-parser; None: chosen from the chat template


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

    def check_free(self, name: str) -> None:
        """400 if a served model (the base or an adapter) already has this name."""
        if name in self._routes:
            raise APIError(400, f"lora_name={name!r} is already in use by a served model", param="lora_name")

    def add_adapter(self, name: str, path: str) -> Route:
        self.check_free(name)
        route = dataclasses.replace(self.base, name=name, adapter=name, root=path)
        self._routes[name] = route
        return route

    def remove_adapter(self, name: str) -> Route:
        route = self.resolve(name)
        if route.adapter is None:
            raise APIError(400, f"lora_name={name!r} is the base model, not an adapter", param="lora_name")
        del self._routes[name]
        return route

    def models(self) -> list[dict]:
        return [{"id": r.name, "object": "model", "created": self.created, "owned_by": "lmq",
                 "root": r.root or r.name, "parent": None if r.adapter is None else self.base.name,
                 "max_model_len": r.max_model_len} for r in self._routes.values()]
