"""The backends an engine can run on, and the one place that decides `--backend auto`.

Each backend says what it cannot serve for a given config (`unsupported`: reasons, empty when it
can) and builds its model runner. `auto` takes the first backend of AUTO_ORDER that can serve
everything asked for; an explicit choice that cannot is a start-up error naming the reasons,
never a silent fallback or a dropped feature. No other module of the core imports an engine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

from lmq.config import EngineConfig
from lmq.step_input import ModelRunner

log = logging.getLogger("lmq")


@dataclass(frozen=True)
class Backend:
    name: str
    unsupported: Callable[[EngineConfig], list[str]]  # why it cannot serve this config ([] = it can)
    make_runner: Callable[[EngineConfig], ModelRunner]  # the engine's runner (lmq.step_input.ModelRunner)


def _pytorch_unsupported(config: EngineConfig) -> list[str]:
    return []  # the reference engine serves every model and feature lmq has, on any torch device


def _pytorch_runner(config: EngineConfig) -> ModelRunner:
    from torch_engine import ops
    from torch_engine.model_runner import ModelRunner

    return ModelRunner(config, ops)


def _turbomind_unsupported(config: EngineConfig) -> list[str]:
    reasons = []
    if not config.device.startswith("cuda"):
        reasons.append(f"it runs on CUDA GPUs only (device={config.device!r})")
    if importlib.util.find_spec("cupy") is None:
        reasons.append("CuPy is not installed (pip install 'lmq[turbomind]')")
    else:
        from turbomind.compiler import CompileError, include_dirs

        try:
            include_dirs()
        except CompileError as e:  # NVRTC needs the CUDA headers to compile the kernels
            reasons.append(str(e))
    from turbomind.launch import HEAD_DIMS

    if config.model.head_dim not in HEAD_DIMS:
        reasons.append(f"its attention kernels take head_dim {' or '.join(map(str, HEAD_DIMS))}, "
                       f"the model has {config.model.head_dim}")
    return reasons


def _turbomind_runner(config: EngineConfig) -> ModelRunner:
    # The model definition is shared: torch_engine's runner and graphs over turbomind's ops.
    from torch_engine.model_runner import ModelRunner
    from turbomind import ops

    return ModelRunner(config, ops)


BACKENDS: dict[str, Backend] = {
    "pytorch": Backend("pytorch", _pytorch_unsupported, _pytorch_runner),
    "turbomind": Backend("turbomind", _turbomind_unsupported, _turbomind_runner),
}
AUTO_ORDER = ("turbomind", "pytorch")  # the fast engine first, the reference engine always serves


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str  # one line for the start-up log


def choose_backend(requested: str, config: EngineConfig) -> BackendChoice:
    """`requested` is "auto" or a backend name; `config` is everything else the engine will be
    asked for (its own `backend` field is ignored)."""
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is invalid: must be one of auto, {', '.join(BACKENDS)}")
    if requested != "auto":
        reasons = BACKENDS[requested].unsupported(config)
        if reasons:
            raise ValueError(f"backend={requested!r} cannot serve this model: {'; '.join(reasons)}")
        return BackendChoice(requested, "asked for")
    passed_over = []
    for name in AUTO_ORDER:
        reasons = BACKENDS[name].unsupported(config)
        if not reasons:
            why = "; ".join(passed_over) if passed_over else "it supports the model and every requested feature"
            return BackendChoice(name, f"auto: {why}")
        passed_over.append(f"not {name}: {', '.join(reasons)}")
    raise AssertionError("the pytorch backend serves every config")


def with_backend(requested: str, config: EngineConfig) -> EngineConfig:
    """The config with its backend decided (and logged, once)."""
    choice = choose_backend(requested, config)
    log.info("lmq: backend %s (%s)", choice.name, choice.reason)
    return dataclasses.replace(config, backend=choice.name)


def make_runner(config: EngineConfig) -> ModelRunner:
    """The config's backend's runner; a config whose backend was set without `with_backend` is
    checked here the same way (the error names every reason)."""
    choose_backend(config.backend, config)
    return BACKENDS[config.backend].make_runner(config)
