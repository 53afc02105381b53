"""AsyncEngine: an LLMEngine stepping on its own thread, one asyncio stream per request.

The server and the web UI are clients of this object. The event loop never waits for a step:
`add_request` tokenizes and validates on the caller's thread (validation reads only fixed
configuration) and queues the request; `abort` queues an abort. The engine thread, the only
one that touches the engine's mutable state, applies the queued operations before each step
and hands the step's RequestOutputs to their streams in one `call_soon_threadsafe` per loop.
A consumer that goes away (client disconnect, task cancelled) aborts its request, which frees
its KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from lmq.engine import EngineStats, LLMEngine
from lmq.sampling import SamplingParams
from lmq.sequence import RequestOutput

log = logging.getLogger("lmq")


Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]]  # per loop: (queue, item)


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue_len requests: try again later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]  # tokenized on the caller's thread
    params: SamplingParams
    stream: bool  # outputs after every step, or only the finished one
    adapter: str | None = None


@dataclass(frozen=True)
class _Call:
    """Run `LLMEngine.<method>(*args)` on the engine thread between steps; the result (or the
    exception) resolves `future` on its event loop."""

    method: str
    args: tuple
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class RequestStream:
    """One request's outputs: a RequestOutput after every step that changed it, the last one
    with `finished=True`. Leaving the iteration early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.engine, self.request_id, self._stream = engine, request_id, stream

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await self._stream.queue.get()
                # Outputs are cumulative: a consumer that fell behind takes only the newest.
                while not isinstance(item, BaseException) and not item.finished and not self._stream.queue.empty():
                    item = self._stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.engine.abort(self.request_id)

    def abort(self) -> None:
        self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue_len: int | None = None) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self._lock = threading.Lock()  # guards _ops and _streams, never held during a step
        self._ops: list[_Add | _Call | str] = []  # queued adds and calls, and request ids to abort
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmq-engine", daemon=True)
        self._thread.start()

    # -- client side (event loop) --------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    stream: bool = True, adapter: str | None = None) -> RequestStream:
        """Validate and queue a request now (ValueError, QueueFullError and EngineDeadError are
        raised here); iterate the returned stream for its outputs: one per step that changed it
        with `stream`, else only the finished one. `adapter`: a loaded adapter's name."""
        ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.engine.validate(ids, params)
        channel = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if not self.alive:
                raise EngineDeadError("the engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request_id={request_id!r} is already in use")
            queued = len(self.engine.scheduler.waiting) + sum(isinstance(op, _Add) for op in self._ops)
            if self.max_queue_len is not None and queued >= self.max_queue_len:
                raise QueueFullError(f"the waiting queue is full ({queued} requests, max_queue_len="
                                     f"{self.max_queue_len}); retry later")
            self._ops.append(_Add(request_id, ids, params, stream, adapter))
            self._streams[request_id] = channel
        self._wake.set()
        return RequestStream(self, request_id, channel)

    async def call(self, method: str, *args: object) -> object:
        """`LLMEngine.<method>(*args)` on the engine thread, between steps (adapter loading and
        unloading); its exception is raised here."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self.alive:
                raise EngineDeadError("the engine is shutting down")
            self._ops.append(_Call(method, args, loop, future))
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream gets a last output with finish_reason "abort"."""
        with self._lock:
            self._ops.append(request_id)
        self._wake.set()

    @property
    def config(self):  # -> EngineConfig: fixed after start-up, so any thread may read it
        return self.engine.config

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        return self.engine.stats()  # plain counters: a read racing a step is at most one step stale

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is still running (each stream gets finish_reason "abort") and stop the thread."""
        with self._lock:
            self._stopping = True
            self._ops.extend(self._streams)
        self._wake.set()
        self._thread.join(timeout)

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # never leave a stream waiting on a dead thread
            log.exception("lmq: the engine thread stopped")
            with self._lock:
                self._stopping = True
                streams, self._streams = list(self._streams.values()), {}
                calls, self._ops = [op for op in self._ops if isinstance(op, _Call)], []
            dead = EngineDeadError(f"the engine thread stopped: {type(e).__name__}: {e}")
            self._post(_group((st, dead) for st in streams))
            for call in calls:
                _resolve(call, None, dead)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                ops, self._ops = self._ops, []
                self._wake.clear()
            outputs = self._apply(ops)
            if self.engine.has_unfinished():
                self._wake.set()  # keep stepping
                try:
                    outputs += self.engine.step()
                except Exception as e:  # a bug, not user input: fail the requests in flight, keep serving
                    log.exception("lmq: engine step failed; aborting the requests in flight")
                    self._fail_all(e)
            self._deliver(outputs)
            if self._stopping and not self.engine.has_unfinished():
                with self._lock:
                    if not self._ops:
                        return

    def _apply(self, ops: list[_Add | _Call | str]) -> list[RequestOutput]:
        outputs = []
        for op in ops:
            if isinstance(op, _Add):
                try:
                    self.engine.add_request(op.request_id, op.prompt_ids, op.params, stream=op.stream,
                                            adapter=op.adapter)
                except Exception as e:  # validated before: a race on the request id or an unload, or a bug
                    self._send(op.request_id, e)
            elif isinstance(op, _Call):
                try:
                    result, error = getattr(self.engine, op.method)(*op.args), None
                except Exception as e:
                    result, error = None, e
                _resolve(op, result, error)
            elif (out := self.engine.abort(op)) is not None:
                outputs.append(out)
        return outputs

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One wake-up per event loop for the whole step, not one per request."""
        pairs = []
        with self._lock:
            for out in outputs:
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    pairs.append((stream, out))
        self._post(_group(pairs))

    def _send(self, request_id: str, item: object) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._post(_group([(stream, item)]))

    @staticmethod
    def _post(by_loop: Deliveries) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read these
                pass

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._send(rid, error)


def _resolve(call: _Call, result: object, error: BaseException | None) -> None:
    def settle() -> None:
        if call.future.done():  # the caller was cancelled
            return
        if error is None:
            call.future.set_result(result)
        else:
            call.future.set_exception(error)

    try:
        call.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # that event loop is closed
        pass


def _group(pairs: Iterable[tuple[_Stream, object]]) -> Deliveries:
    """(stream, item) pairs -> per event loop, the (queue, item) pairs to put there."""
    by_loop: Deliveries = defaultdict(list)
    for stream, item in pairs:
        by_loop[stream.loop].append((stream.queue, item))
    return by_loop


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
