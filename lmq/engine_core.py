"""The engine core: an LLMEngine stepping in its own process (the server process's AsyncEngine
starts it), so its per-step Python work never waits for the server's event loop on one GIL.

    server process                                   engine process (spawned)
    AsyncEngine ── sender thread ── list[Op] ───────► EngineCore.run:
                                                        apply ops (add / abort / call / ...)
                                                        launch a step (when something is unfinished)
               ◄── receiver thread ◄── CoreUpdate ───── one message per loop turn, sent while
                                                        the device runs the step: the previous
                                                        step's RequestDeltas, call results, stats
                                                        finish the step (wait for its tokens)

Protocol: the child sends exactly one CoreStarted (its final config, or why it could not start),
then a CoreUpdate per loop turn that changed anything the parent sees. Idle, it blocks on the
pipe. It exits after a Shutdown op (every request aborted first) or when the parent's end of
the pipe closes.
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
from lmq.engine import EngineStats, LLMEngine, StepInFlight
from lmq.sampling import SamplingParams
from lmq.sequence import Request

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
    """Test-only: sleep `step_delay` seconds before every step; make the next `fail_steps` steps
    (after `fail_after` more that launch) raise, which takes the real failure path (the requests
    in flight fail, the engine keeps serving); run only `pause_after` more steps, then hold
    every request where it is (ops are still applied: aborts, calls) until the hooks change. A
    tiny model finishes any request before a test can look at it: holding it makes "still
    running" true by construction."""

    step_delay: float = 0.0
    fail_steps: int = 0
    pause_after: int | None = None  # None: never hold
    fail_encodes: int = 0  # image-encoder batches that raise (the real failure path of the pool)
    fail_after: int = 0


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
        engine = LLMEngine(config, Tokenizer.for_config(config))
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
        self.fail_after = 0
        self.steps_left: int | None = None  # DebugHooks.pause_after: steps until the engine holds
        self.stopping = False
        self.failed: list[RequestDelta] = []  # deltas of requests failed after the last update was sent
        self.overlap = engine.runner.device.type == "cuda"  # the device runs a step while the host works
        self.async_scheduling = engine.config.scheduler.async_scheduling
        self.in_flight: StepInFlight | None = None  # async scheduling: the step launched last turn

    def run(self) -> None:
        """One turn: apply the ops that arrived, launch a step, send what the previous step
        changed while the device computes this one, then wait for this step's tokens.

            host:    apply ops | launch n | outputs of n-1, send | finish n (wait) | apply ops | launch n+1
            device:            | forward + sample n ...........  |                  |           | ...

        Scheduling step n+1 needs step n's tokens, so only the output work (detokenizing,
        snapshots, deltas, pickling) overlaps the device; that is most of what a server adds
        over the offline engine. On a CPU the forward pass runs inside `launch_step`, so there
        is nothing to overlap and a step's outputs go out in its own turn, one step sooner.

        With async scheduling, step n+1 is scheduled and queued before step n is read back (its
        sampled tokens feed n+1 on the device), so the device goes from one step to the next:

            host:    apply ops | launch n+1 | finish n (wait) | outputs of n, send | apply ops | launch n+2
            device:  ... n ................ | n+1 ................................ | ...

        A step whose tokens the next one needs on the host (a grammar, penalties) is finished
        before the next launch, and so is any step still running when an engine call arrives."""
        touched: dict[str, Request] = {}  # changed by the last turn, outputs not sent yet
        while True:
            idle = not (self._can_step() or touched or self.failed or self.in_flight)
            ops = self._receive(block=idle)
            if ops is None:  # the parent is gone: nobody is left to serve
                return
            deltas, self.failed = self.failed, []
            results: list[CallResult] = []
            if self.in_flight is not None and (not self.in_flight.overlaps or
                                               any(isinstance(op, Call) for op in ops)):
                touched.update(self._finish(self.in_flight, deltas))
                self.in_flight = None
            for op in ops:
                self._apply(op, touched, deltas, results)
            step = None
            if self._can_step():
                touched.update((req.request_id, req) for req in self.engine.abort_broken_adapters())
                step = self._launch(touched, deltas)
                deltas += self._failed_requests()
            if self.async_scheduling:
                if self.in_flight is not None:
                    touched.update(self._finish(self.in_flight, deltas))
                self.in_flight, step = step, None
            elif step is not None and not self.overlap:
                touched.update(self._finish(step, deltas))
                step = None
            deltas += [self.encoder.encode(out) for out in self.engine.outputs(list(touched.values()))]
            if not self._send(deltas, results):
                return
            touched = self._finish(step, self.failed) if step is not None else {}
            if self.stopping and not (self.engine.has_unfinished() or touched or self.failed or self.in_flight):
                return

    def _can_step(self) -> bool:
        return self.engine.has_unfinished() and self.steps_left != 0

    def _send(self, deltas: list[RequestDelta], results: list[CallResult]) -> bool:
        """One update, if anything the parent sees changed; False when the parent is gone."""
        stats = self.engine.stats()
        if deltas or results or stats != self.sent_stats or self.adds_applied != self.sent_adds:
            try:
                self.updates.send(CoreUpdate(deltas, results, stats, self.adds_applied))
            except OSError:
                return False
            self.sent_stats, self.sent_adds = stats, self.adds_applied
        return True

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

    def _apply(self, op: Op, touched: dict[str, Request], deltas: list[RequestDelta],
               results: list[CallResult]) -> None:
        if isinstance(op, Add):
            self.adds_applied += 1
            try:
                self.engine.add_request(op.request_id, op.prompt_ids, op.params, stream=op.stream, validated=True,
                                        **op.extra)
            except Exception as e:  # e.g. an unknown adapter: the parent could not know
                deltas.append(failed_delta(op.request_id, portable(e)))
        elif isinstance(op, Abort):
            if (req := self.engine.abort_request(op.request_id)) is not None:
                touched[req.request_id] = req
        elif isinstance(op, Call):
            results.append(self._call(op))
        elif isinstance(op, DebugHooks):
            self.step_delay, self.fail_steps, self.steps_left = op.step_delay, op.fail_steps, op.pause_after
            self.fail_after = op.fail_after
            if self.engine.encoders is not None:
                self.engine.encoders.fail_batches = op.fail_encodes
        elif isinstance(op, Shutdown):
            self.stopping = True
            for rid in list(self.engine.requests):
                touched[rid] = self.engine.abort_request(rid)

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

    def _launch(self, touched: dict[str, Request], deltas: list[RequestDelta]) -> StepInFlight | None:
        """The step, queued on the device; None if it failed (its requests fail with it). Under
        async scheduling the step before it is read back first: the tokens it sampled are kept,
        and the requests it finished end as they would have, not with this step's error."""
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.steps_left:
            self.steps_left -= 1
        try:
            if self.fail_after:
                self.fail_after -= 1
            elif self.fail_steps:
                self.fail_steps -= 1
                raise RuntimeError("injected step failure (DebugHooks.fail_steps)")
            return self.engine.launch_step()
        except Exception as e:
            if self.in_flight is not None:
                touched.update(self._finish(self.in_flight, deltas))
                self.in_flight = None
            failed = self._fail_in_flight(e, [])
            for rid in failed:  # finished earlier, they keep their outputs; these do not
                touched.pop(rid, None)
            deltas += [failed_delta(rid, portable(e)) for rid in failed]
            return None

    def _failed_requests(self) -> list[RequestDelta]:
        """Requests the engine ended with an error of their own (an image the encoder failed on)."""
        out = []
        for rid, error in self.engine.take_failures():
            self.encoder.forget(rid)
            out.append(failed_delta(rid, portable(error)))
        return out

    def _finish(self, step: StepInFlight, failed: list[RequestDelta]) -> dict[str, Request]:
        """The requests the step changed. If it fails, they and the rest in flight fail, with
        their deltas added to `failed`."""
        try:
            self.engine.finish_step(step)
            return step.touched
        except Exception as e:
            failed += [failed_delta(rid, portable(e)) for rid in self._fail_in_flight(e, list(step.touched))]
            return {}

    def _fail_in_flight(self, error: Exception, also: list[str]) -> list[str]:
        """A failed step is a bug, not user input: abort every request in flight (and `also`,
        which may have left it already) and keep serving. Returns their ids."""
        log.error("lmq: engine step failed; failing the requests in flight", exc_info=error)
        rids = list(dict.fromkeys(list(self.engine.requests) + also))
        for rid in rids:
            self.engine.abort_request(rid)
            self.encoder.forget(rid)
        return rids


def portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
