"""The engine core: an LLMEngine stepping in its own process (the server process's AsyncEngine
starts it), so its per-step Python work never waits for the server's event loop on one GIL.

    server process                                   engine process (spawned)
    AsyncEngine ── sender thread ── list[Op] ───────► EngineCore.run:
                                                        apply ops (add / abort / call / ...)
                                                        step (when something is unfinished)
               ◄── receiver thread ◄── CoreUpdate ───── one message per loop turn: the
                                                        step's RequestDeltas, call results, stats

Protocol: the child sends exactly one CoreStarted (its final config, or why it could not start),
then a CoreUpdate per loop turn that changed anything the parent sees. Idle, it blocks on the pipe. It exits after
a Shutdown op (every request aborted first) or when the parent's end of the pipe closes.
"""

from __future__ import annotations

import gc
import logging
import operator
import os
import pickle
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from lmq.config import EngineConfig
from lmq.deltas import DeltaEncoder, RequestDelta, failed_delta
from lmq.engine import EngineStats, LLMEngine
from lmq.sampling import SamplingParams
from lmq.sequence import RequestOutput

log = logging.getLogger("lmq")


# -- parent -> child ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Add:
    request_id: str
    prompt_ids: list[int]  # tokenized and validated by the parent
    params: SamplingParams
    stream: bool  # outputs after every step, or only the finished one
    extra: dict = field(default_factory=dict)  # more keyword arguments for LLMEngine.add_request


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Call:
    """Run `method` (a dotted attribute path from the LLMEngine) with `args` between steps."""

    call_id: int
    method: str
    args: tuple


@dataclass(frozen=True)
class DebugHooks:
    """Test-only: sleep `step_delay` seconds before every step (a tiny model is otherwise done
    before a test can look at it), and make the next `fail_steps` steps raise, which takes the
    real failure path: the requests in flight fail, the engine keeps serving."""

    step_delay: float = 0.0
    fail_steps: int = 0


@dataclass(frozen=True)
class Shutdown:
    pass


Op = Add | Abort | Call | DebugHooks | Shutdown


# -- child -> parent ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreStarted:
    config: EngineConfig | None  # final: num_kv_blocks profiled
    stats: EngineStats | None
    error: BaseException | None = None


@dataclass(frozen=True)
class CallResult:
    call_id: int
    value: object = None
    error: BaseException | None = None


@dataclass(frozen=True)
class CoreUpdate:
    deltas: list[RequestDelta]
    results: list[CallResult]
    stats: EngineStats
    adds_applied: int  # Add ops taken so far: the parent's count minus this is still in the pipe


def run_engine_core(config: EngineConfig, ops: Connection, updates: Connection) -> None:
    """The child process's entry point (a module-level function: spawn pickles it by name)."""
    # Ctrl-C in a terminal signals the whole process group: the parent alone decides when the
    # engine stops (it aborts the running requests first), so the child ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from lmq.tokenizer import Tokenizer

    try:
        engine = LLMEngine(config, Tokenizer(config.model.path))
    except BaseException as e:
        updates.send(CoreStarted(None, None, portable(e)))
        return
    # What start-up built lives as long as the process: out of the collector's sight, so the
    # full collections that per-step garbage triggers stay short.
    gc.collect()
    gc.freeze()
    updates.send(CoreStarted(engine.config, engine.stats()))
    profile_dir = os.environ.get("LMQ_PROFILE_CORE")  # a folder: profile the loop (benchmarks)
    if not profile_dir:
        EngineCore(engine, ops, updates).run()
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(EngineCore(engine, ops, updates).run)
    with open(os.path.join(profile_dir, f"engine_core-{os.getpid()}.txt"), "w") as f:
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)


class EngineCore:
    """The child's loop. Owns the engine: nothing else touches it."""

    def __init__(self, engine: LLMEngine, ops: Connection, updates: Connection) -> None:
        self.engine, self.ops, self.updates = engine, ops, updates
        self.encoder = DeltaEncoder()
        self.adds_applied = 0
        self.sent_stats: EngineStats | None = None  # as of the last update: unchanged ones are not sent
        self.sent_adds = 0
        self.step_delay = 0.0
        self.fail_steps = 0
        self.stopping = False

    def run(self) -> None:
        while True:
            ops = self._receive(block=not self.engine.has_unfinished())
            if ops is None:  # the parent is gone: nobody is left to serve
                return
            outputs: list[RequestOutput] = []
            deltas: list[RequestDelta] = []
            results: list[CallResult] = []
            for op in ops:
                self._apply(op, outputs, deltas, results)
            if self.engine.has_unfinished():
                outputs += self._step(deltas)
            deltas += [self.encoder.encode(out) for out in outputs]
            stats = self.engine.stats()
            if deltas or results or stats != self.sent_stats or self.adds_applied != self.sent_adds:
                try:
                    self.updates.send(CoreUpdate(deltas, results, stats, self.adds_applied))
                except OSError:  # the parent is gone
                    return
                self.sent_stats, self.sent_adds = stats, self.adds_applied
            if self.stopping and not self.engine.has_unfinished():
                return

    def _receive(self, block: bool) -> list[Op] | None:
        """Every op batch waiting in the pipe; blocks for the first one only when idle."""
        ops: list[Op] = []
        try:
            if block:
                ops += self.ops.recv()
            while self.ops.poll():
                ops += self.ops.recv()
        except (EOFError, OSError):
            return None
        return ops

    def _apply(self, op: Op, outputs: list[RequestOutput], deltas: list[RequestDelta],
               results: list[CallResult]) -> None:
        if isinstance(op, Add):
            self.adds_applied += 1
            try:
                self.engine.add_request(op.request_id, op.prompt_ids, op.params, stream=op.stream, validated=True,
                                        **op.extra)
            except Exception as e:  # e.g. an unknown adapter: the parent could not know
                deltas.append(failed_delta(op.request_id, portable(e)))
        elif isinstance(op, Abort):
            if (out := self.engine.abort(op.request_id)) is not None:
                outputs.append(out)
        elif isinstance(op, Call):
            results.append(self._call(op))
        elif isinstance(op, DebugHooks):
            self.step_delay, self.fail_steps = op.step_delay, op.fail_steps
        elif isinstance(op, Shutdown):
            self.stopping = True
            for rid in list(self.engine.requests):
                if (out := self.engine.abort(rid)) is not None:
                    outputs.append(out)

    def _call(self, op: Call) -> CallResult:
        try:
            value = operator.attrgetter(op.method)(self.engine)(*op.args)
        except Exception as e:
            return CallResult(op.call_id, error=portable(e))
        try:  # calls are rare: checked here, so one bad value cannot sink the whole update
            pickle.loads(pickle.dumps(value))
        except Exception as e:
            return CallResult(op.call_id, error=TypeError(f"{op.method} returned a value that cannot be sent to "
                                                          f"the server process: {type(e).__name__}: {e}"))
        return CallResult(op.call_id, value)

    def _step(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        try:
            if self.fail_steps:
                self.fail_steps -= 1
                raise RuntimeError("injected step failure (DebugHooks.fail_steps)")
            return self.engine.step()
        except Exception as e:  # a bug, not user input: fail the requests in flight, keep serving
            log.exception("lmq: engine step failed; failing the requests in flight")
            error = portable(e)
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
                self.encoder.forget(rid)
                deltas.append(failed_delta(rid, error))
            return []


def portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
