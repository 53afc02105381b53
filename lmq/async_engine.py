"""AsyncEngine: an LLMEngine stepping on its own thread, one asyncio stream per request.

The server and the web UI are clients of this object. Requests are added and aborted from the
event loop under a lock; the engine thread steps while there is work and hands every
RequestOutput to its request's asyncio queue with `call_soon_threadsafe`. A consumer that goes
away (client disconnect, task cancelled) aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lmq.engine import EngineStats, LLMEngine
from lmq.sampling import SamplingParams
from lmq.sequence import RequestOutput

log = logging.getLogger("lmq")


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue_len requests: try again later."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class RequestStream:
    """One request's outputs: a RequestOutput after every step that changed it, the last one
    with `finished=True`. Leaving the iteration early (or `aclose`) aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.engine, self.request_id, self._stream = engine, request_id, stream

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await self._stream.queue.get()
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
        self._lock = threading.Lock()  # engine calls: add/abort from the loop, step from the thread
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmq-engine", daemon=True)
        self._thread.start()

    # -- client side (event loop) --------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Validate and queue a request now (ValueError, QueueFullError and EngineDeadError are
        raised here); iterate the returned stream for its outputs."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._stopping or not self._thread.is_alive():
                raise EngineDeadError("the engine is shutting down")
            waiting = len(self.engine.scheduler.waiting)
            if self.max_queue_len is not None and waiting >= self.max_queue_len:
                raise QueueFullError(f"the waiting queue is full ({waiting} requests, max_queue_len="
                                     f"{self.max_queue_len}); retry later")
            self.engine.add_request(request_id, prompt, params, stream=True)
            self._streams[request_id] = stream
        self._wake.set()
        return RequestStream(self, request_id, stream)

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        async for out in self.add_request(request_id, prompt, params):
            yield out

    def abort(self, request_id: str) -> None:
        with self._lock:
            out = self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
        if out is not None and stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is still running (each stream gets finish_reason "abort") and stop the thread."""
        with self._lock:
            self._stopping = True
            ids = list(self._streams)
        for rid in ids:
            self.abort(rid)
        self._wake.set()
        self._thread.join(timeout)

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                if self._stopping:
                    return
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug, not user input: fail the in-flight requests, keep serving
                    log.exception("lmq: engine step failed; aborting the requests in flight")
                    self._fail_all(e)
                    continue
                deliveries = [(self._stream_for(o), o) for o in outputs]
            for stream, out in deliveries:
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _stream_for(self, out: RequestOutput) -> _Stream | None:
        """The request's stream; a finished request's stream is delivered to one last time."""
        if out.finished:
            return self._streams.pop(out.request_id, None)
        return self._streams.get(out.request_id)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
