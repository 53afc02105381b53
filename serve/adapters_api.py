"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's shapes).

Loading reads and validates the folder on a worker thread (the event loop and the engine keep
serving), then registers it with the engine between two steps; only then does its name route.
Paths must lie inside the operator's --lora-dir (403 otherwise); without one, runtime loading
is off. Unloading removes the name at once (new requests get 404) while requests already
running on the adapter finish.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from lmq.async_engine import EngineDeadError
from lora.adapter import AdapterError, read_adapter
from serve.errors import APIError
from serve.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from serve.router import Router


class AdapterAdmin:
    def __init__(self, router: Router, lora_dir: str | None) -> None:
        self.router = router
        self.lora_dir = Path(os.path.realpath(lora_dir)) if lora_dir else None
        self._lock = asyncio.Lock()  # one load/unload at a time: names are checked, then taken

    def resolve_path(self, path: str) -> str:
        if self.lora_dir is None:
            raise APIError(403, "runtime adapter loading is disabled: start `lmq serve` with --lora-dir DIR",
                           param="lora_path")
        full = Path(os.path.realpath(self.lora_dir / path))  # an absolute `path` replaces lora_dir
        if not full.is_relative_to(self.lora_dir):
            raise APIError(403, f"lora_path={path!r} is outside the allowed --lora-dir {str(self.lora_dir)!r}",
                           param="lora_path")
        return str(full)

    async def load(self, req: LoadLoRAAdapterRequest) -> str:
        engine, config = self.router.base.engine, self.router.base.engine.config
        if config.lora is None:
            raise APIError(400, "LoRA is not enabled: start `lmq serve` with --enable-lora, --adapters or "
                                "--lora-dir", param="lora_name")
        path = self.resolve_path(req.lora_path)
        async with self._lock:
            self._check_free(req.lora_name)
            try:
                weights = await asyncio.to_thread(read_adapter, path, config.model, config.lora.max_lora_rank)
                await engine.call("add_adapter", req.lora_name, weights)
            except (AdapterError, ValueError) as e:
                raise APIError(400, f"cannot load adapter {req.lora_name!r}: {e}", param="lora_path") from None
            except EngineDeadError as e:
                raise APIError(503, str(e)) from None
            self.router.add_adapter(req.lora_name, path)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload(self, req: UnloadLoRAAdapterRequest) -> str:
        async with self._lock:
            route = self.router.remove_adapter(req.lora_name)
            try:
                await route.engine.call("unload_adapter", req.lora_name)
            except EngineDeadError as e:
                raise APIError(503, str(e)) from None
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def _check_free(self, name: str) -> None:
        if not name or len(name) > 256:
            raise APIError(400, f"lora_name={name!r} is invalid: must be 1 to 256 characters", param="lora_name")
        self.router.check_free(name)  # before reading the folder; add_adapter checks again under the lock
