"""AsyncEngine: the engine core in its own process, one asyncio stream per request.

The server and the web UI are clients of this object. The engine (weights, scheduler, sampler,
detokenizer) runs in a child process started with `spawn` (see engine_core.py), so its per-step
Python work and the server's event loop never queue for one GIL. This side keeps only the
tokenizer and the final engine config:

- `add_request` tokenizes and validates on the caller's thread (ValueError, QueueFullError and
  EngineDeadError are raised there), then queues the request for the sender thread, which
  batches whatever is queued into one pipe message; the event loop never blocks on the pipe.
- The receiver thread takes one CoreUpdate per engine step, rebuilds each request's cumulative
  RequestOutput from its delta, and hands them to their streams in one `call_soon_threadsafe`
  per event loop.
- A consumer that goes away (client disconnect, task cancelled) aborts its request, which frees
  its KV blocks at the next step boundary. The engine process dying fails every stream, call
  and later request with EngineDeadError; it is never waited on without a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from lmq import engine_core as core
from lmq.config import EngineConfig
from lmq.deltas import OutputAssembler
from lmq.engine import EngineStats, validate_request
from lmq.multimodal import ProcessedImage, expand_image_tokens
from lmq.sampling import SamplingParams, truncate_prompt
from lmq.sequence import RequestOutput
from lmq.tokenizer import Tokenizer

log = logging.getLogger("lmq")


Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]]  # per loop: (queue, item)


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queue_len requests: try again later."""


class EngineDeadError(RuntimeError):
    """The engine process has stopped."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Live:
    """A request the engine process has not finished yet, as this side sees it."""

    stream: _Stream
    assembler: OutputAssembler  # touched by the receiver thread only
    aborting: bool = False


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
    """Starts the engine process and blocks until it is ready (model loaded, KV cache sized);
    its start-up error is raised here. `start_timeout`: seconds to wait for that (None: as long
    as the process lives; loading a large model takes minutes). A script that builds one needs
    the `if __name__ == "__main__":` guard, as `spawn` imports the main module in the child."""

    def __init__(self, config: EngineConfig, max_queue_len: int | None = None,
                 start_timeout: float | None = None) -> None:
        self.max_queue_len = max_queue_len
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot live in a forked child
        ops_in, self._ops = ctx.Pipe(duplex=False)
        self._updates, updates_out = ctx.Pipe(duplex=False)
        _widen(self._ops)
        _widen(self._updates)
        self.process = ctx.Process(target=core.run_engine_core, args=(config, ops_in, updates_out),
                                   name="lmq-engine-core", daemon=True)
        self.process.start()
        # Only the child keeps its ends: its death then reads as end-of-file here.
        ops_in.close()
        updates_out.close()
        try:
            self.tokenizer = Tokenizer.for_config(config)  # while the child loads the model
            started = self._wait_started(start_timeout)
        except BaseException:
            self._kill()
            raise
        self.config: EngineConfig = started.config
        self._stats: EngineStats = started.stats
        self._lock = threading.Lock()  # guards the fields below
        self._live: dict[str, _Live] = {}
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._adds_sent = 0
        self._adds_applied = 0
        self._stopping = False
        self._dead = False
        self._outbox: list[core.Op] = []
        self._outbox_ready = threading.Condition()
        self._sender = threading.Thread(target=self._send_loop, name="lmq-engine-sender", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="lmq-engine-receiver", daemon=True)
        self._sender.start()
        self._receiver.start()

    def _wait_started(self, timeout: float | None) -> core.CoreStarted:
        ready = wait([self._updates, self.process.sentinel], timeout)
        if not ready:
            raise EngineDeadError(f"the engine process did not start within start_timeout={timeout} s")
        started = None
        if self._updates in ready:
            try:
                started = self._updates.recv()
            except EOFError:
                pass
        if started is None:
            self.process.join(5)
            raise EngineDeadError(f"the engine process exited while starting (exit code {self.process.exitcode})")
        if started.error is not None:
            self.process.join(30)
            raise started.error
        return started

    # -- client side ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, stream: bool = True,
                    images: list[ProcessedImage] | None = None, **extra: object) -> RequestStream:
        """Validate and queue a request now (ValueError, QueueFullError and EngineDeadError are
        raised here); iterate the returned stream for its outputs: one per step that changed it
        with `stream`, else only the finished one. images: one per placeholder token of the
        prompt, expanded here (so the length check counts their tokens). `extra` goes on to
        LLMEngine.add_request (e.g. adapter="name"); what only the engine can check (an unknown
        adapter, an encoder failure) fails the stream instead."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids = truncate_prompt(ids, params, self.config.scheduler.max_model_len, bool(images))
        ids, inputs = expand_image_tokens(ids, list(images or []), self.config.model.vision)
        if inputs:
            extra["images"] = inputs
        validate_request(self.config, ids, params)
        channel = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        text = prompt if isinstance(prompt, str) else None
        live = _Live(channel, OutputAssembler(request_id, text, ids, params, time.monotonic()))
        with self._lock:
            self._check_open()
            if request_id in self._live:
                raise ValueError(f"request_id={request_id!r} is already in use")
            # Waiting in the engine at its last step, plus adds it has not taken yet.
            queued = self._stats.num_waiting + self._adds_sent - self._adds_applied
            if self.max_queue_len is not None and queued >= self.max_queue_len:
                raise QueueFullError(f"the waiting queue is full ({queued} requests, max_queue_len="
                                     f"{self.max_queue_len}); retry later")
            self._live[request_id] = live
            self._adds_sent += 1
            self._queue(core.Add(request_id, ids, params, stream, extra))  # under the lock: ops stay in order
        return RequestStream(self, request_id, channel)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream gets a last output with finish_reason "abort". A no-op for
        a request that has finished."""
        with self._lock:
            live = self._live.get(request_id)
            if live is None or live.aborting or self._dead:
                return
            live.aborting = True
            self._queue(core.Abort(request_id))

    async def call(self, method: str, *args: object) -> object:
        """`getattr(llm_engine, method)(*args)` in the engine process between two steps (a dotted
        path reaches further: "block_manager.check_integrity"); returns its (picklable) result
        or raises its exception here."""
        return await asyncio.wrap_future(self._call(method, args))

    def call_blocking(self, method: str, *args: object, timeout: float | None = None) -> object:
        """`call` for code outside an event loop (tests, threads)."""
        return self._call(method, args).result(timeout)

    def set_debug_hooks(self, step_delay: float = 0.0, fail_steps: int = 0, pause_after: int | None = None,
                        fail_encodes: int = 0, fail_after: int = 0) -> None:
        """Test-only (see engine_core.DebugHooks): sleep `step_delay` s before every step; make the
        next `fail_steps` steps after `fail_after` more (and `fail_encodes` image-encoder batches)
        raise; hold every request after `pause_after` more steps until the next call. Applies from
        the engine's next turn, before the requests queued after it."""
        with self._lock:
            self._check_open()
            self._queue(core.DebugHooks(step_delay, fail_steps, pause_after, fail_encodes, fail_after))

    @property
    def alive(self) -> bool:
        return not self._stopping and not self._dead

    def stats(self) -> EngineStats:
        """As of the engine's last step."""
        return self._stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is still running (each stream gets finish_reason "abort"), then stop the
        engine process: it is asked first, killed if it has not exited after `timeout` s."""
        with self._lock:
            ask = not self._stopping and not self._dead
            self._stopping = True
            if ask:
                self._queue(core.Shutdown())
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("lmq: the engine process did not stop within %.0f s; killing it", timeout)
        self._kill()
        self._receiver.join(timeout)
        with self._outbox_ready:
            self._outbox_ready.notify()  # a sender still waiting for ops sees _dead and ends
        self._sender.join(timeout)
        if not self._receiver.is_alive() and not self._sender.is_alive():
            self._ops.close()
            self._updates.close()

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def _check_open(self) -> None:
        if self._dead:
            raise EngineDeadError("the engine process has stopped")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _call(self, method: str, args: tuple) -> Future:
        future: Future = Future()
        with self._lock:
            self._check_open()
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            self._queue(core.Call(call_id, method, args))
        return future

    def _queue(self, op: core.Op) -> None:
        with self._outbox_ready:
            self._outbox.append(op)
            self._outbox_ready.notify()

    # -- sender thread -------------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            while True:
                with self._outbox_ready:
                    while not self._outbox and not self._dead:
                        self._outbox_ready.wait()
                    ops, self._outbox = self._outbox, []
                if not ops or not self._send(ops) or any(isinstance(op, core.Shutdown) for op in ops):
                    return
        except BaseException:  # nothing would reach the engine again: stop it, fail everything
            log.exception("lmq: the engine sender thread stopped")
            self._kill()

    def _send(self, ops: list[core.Op]) -> bool:
        """False once the engine process is gone (the receiver thread reports that)."""
        try:
            self._ops.send(ops)  # pickles everything before it writes a byte
            return True
        except OSError:
            return False
        except Exception:  # something in one op cannot be pickled: refuse that one, send the rest
            for op in ops:
                try:
                    self._ops.send([op])
                except OSError:
                    return False
                except Exception as e:
                    self._refuse(op, e)
            return True

    def _refuse(self, op: core.Op, error: Exception) -> None:
        error = TypeError(f"cannot send this to the engine process: {type(error).__name__}: {error}")
        with self._lock:
            if isinstance(op, core.Add):
                self._adds_sent -= 1
                live = self._live.pop(op.request_id, None)
            else:
                live = None
            future = self._calls.pop(op.call_id, None) if isinstance(op, core.Call) else None
        if live is not None:
            self._post(_group([(live.stream, error)]))
        if future is not None:
            _settle(future, error=error)

    # -- receiver thread -----------------------------------------------------------------------
    def _receive_loop(self) -> None:
        try:
            while True:
                # The sentinel too: a grandchild holding the pipe open must not hide a death.
                ready = wait([self._updates, self.process.sentinel])
                if self._updates not in ready:
                    return
                updates: list[core.CoreUpdate] = []
                try:
                    updates.append(self._updates.recv())
                    while self._updates.poll():  # behind: take all that waits, deliver it once
                        updates.append(self._updates.recv())
                except EOFError:
                    return
                finally:
                    if updates:
                        self._on_updates(updates)
        except BaseException:
            log.exception("lmq: the engine receiver thread stopped")
            self._kill()
        finally:
            self._on_engine_gone()

    def _on_updates(self, updates: list[core.CoreUpdate]) -> None:
        """Several updates of one request cost one snapshot: its stream keeps only the newest."""
        touched: dict[str, tuple[_Live, bool]] = {}  # request id -> (its entry, finished)
        failed: list[tuple[_Live, BaseException]] = []
        with self._lock:
            self._stats, self._adds_applied = updates[-1].stats, updates[-1].adds_applied
            for update in updates:
                for delta in update.deltas:
                    rid, finished, error = delta[0], delta[2], delta[-1]
                    # A finished request leaves the table here, so its id is free again at once.
                    live = self._live.pop(rid, None) if finished else self._live.get(rid)
                    if live is None:
                        continue
                    if error is not None:
                        failed.append((live, error))
                        touched.pop(rid, None)
                    else:
                        live.assembler.update(delta)  # only this thread touches assemblers
                        touched[rid] = (live, finished)
            calls = [(self._calls.pop(r.call_id, None), r) for u in updates for r in u.results]
        pairs = [(live.stream, live.assembler.snapshot(finished)) for live, finished in touched.values()]
        pairs += [(live.stream, error) for live, error in failed]
        self._post(_group(pairs))
        for future, result in calls:
            if future is not None:
                _settle(future, result.value, result.error)

    def _on_engine_gone(self) -> None:
        with self._lock:
            self._dead = True
            lives, self._live = list(self._live.values()), {}
            calls, self._calls = list(self._calls.values()), {}
            expected = self._stopping
        if not expected:
            self._kill()  # reap it (no zombie while this side answers 503), or end it if it hangs on
            log.error("lmq: the engine process stopped unexpectedly (exit code %s); failing every request",
                      self.process.exitcode)
        why = "the engine process has stopped" + ("" if expected else " unexpectedly (see its log)")
        self._post(_group((live.stream, EngineDeadError(why)) for live in lives))
        for future in calls:
            _settle(future, error=EngineDeadError(why))
        with self._outbox_ready:
            self._outbox_ready.notify()

    @staticmethod
    def _post(by_loop: Deliveries) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read these
                pass


def _widen(conn: Connection) -> None:
    """A pipe of 1 MiB instead of Linux's 64 KiB: a burst of adds or step updates then seldom
    blocks its writer (above all the engine process, which must not wait for this one)."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


def _settle(future: Future, value: object = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:  # its caller stopped waiting (cancelled)
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
