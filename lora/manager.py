"""AdapterManager: which adapters exist, which are in host memory, which hold a device slot.

Three tiers:

    registry   name -> Adapter (path, rank, a unique id); every adapter a request may name
    host (CPU) LRU of at most max_cpu_loras adapters packed as SlotImages (one buffer each, in
               the model dtype, pinned on a CUDA engine: a slot load is one transfer); a miss is
               read from disk again on a background thread while other requests keep running
    slots      max_loras device slots, each holding one adapter's stacked A/B weights

A running sequence pins its adapter's slot; a slot is only reused (least recently pinned
first) when no running sequence pins it. The scheduler asks `can_activate` before admitting a
sequence and `activate`s it when it does, so one step never uses more adapters than slots.

Unloading takes a name out of the registry at once (new requests cannot name it); requests
already accepted keep a reference and finish first, then the slot and host copy are dropped.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora.adapter import AdapterError, LoRAAdapter, read_adapter
from lora.slot_image import SlotImage, SlotLayout, pack

if TYPE_CHECKING:  # lmq imports lora at run time, not the other way round
    from lmq.config import LoRAConfig, ModelConfig

log = logging.getLogger("lmq")

SlotLoader = Callable[[int, SlotImage | None], None]  # (slot, packed weights or None to clear)


@dataclass(eq=False)
class Adapter:
    """A registered adapter. `uid` is unique per load, so a name reused after an unload never
    shares prefix-cache blocks or slots with the adapter it replaced."""

    name: str
    path: str
    rank: int
    uid: int
    num_requests: int = 0  # accepted requests not yet finished
    unloaded: bool = False
    error: str | None = None  # a reload from disk failed
    _future: Future | None = field(default=None, repr=False)


class AdapterManager:
    def __init__(self, config: LoRAConfig, model: ModelConfig, load_slot: SlotLoader,
                 pin_memory: bool = False) -> None:
        """pin_memory: keep host copies page-locked (a CUDA device: slot loads copy asynchronously)."""
        self.config = config
        self.model = model
        self.load_slot = load_slot
        self.pin_memory = pin_memory
        self.layout = SlotLayout.for_model(model)
        self.registry: dict[str, Adapter] = {}
        self.host: OrderedDict[int, SlotImage] = OrderedDict()  # uid -> packed weights, LRU order
        self.slots: list[Adapter | None] = [None] * config.max_loras
        self.slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(config.max_loras))
        self.pins: dict[int, int] = {}  # seq_id -> slot
        self.slot_pins = [0] * config.max_loras
        self.num_slot_loads = 0
        self.num_reads = 0  # host-tier misses read from disk
        self.num_errors = 0  # failed re-reads; the engine aborts the requests of such adapters
        self.num_requests = 0  # sum of every Adapter.num_requests, unloaded ones too (read by each step's stats)
        self._uids = itertools.count(1)
        self._pending: set[Adapter] = set()  # host-tier misses being read from disk
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmq-lora")

    # -- registry ------------------------------------------------------------------------------
    def read(self, path: str) -> LoRAAdapter:
        """Read and validate an adapter folder (AdapterError with the reason)."""
        return read_adapter(path, self.model, self.config.max_lora_rank)

    def pack(self, weights: LoRAAdapter) -> SlotImage:
        """The host tier's copy of an adapter: packed for one-transfer slot loads."""
        return pack(weights, self.layout, self.model.dtype, pin=self.pin_memory)

    def _read_packed(self, path: str) -> SlotImage:
        return self.pack(self.read(path))

    def add(self, name: str, weights: LoRAAdapter) -> Adapter:
        if name in self.registry:
            raise ValueError(f"adapter name {name!r} is already loaded")
        adapter = Adapter(name, weights.path, weights.rank, next(self._uids))
        self.registry[name] = adapter
        self._keep_host(adapter.uid, self.pack(weights))
        log.info("lmq: adapter %r loaded from %s (rank %d)", name, weights.path, adapter.rank)
        return adapter

    def remove(self, name: str) -> None:
        adapter = self.get(name)
        del self.registry[name]
        adapter.unloaded = True
        self._drop_if_unused(adapter)

    def get(self, name: str) -> Adapter:
        adapter = self.registry.get(name)
        if adapter is None:
            known = ", ".join(self.registry) or "none"
            raise ValueError(f"adapter {name!r} is not loaded (loaded adapters: {known})")
        return adapter

    def retain(self, adapter: Adapter) -> None:
        adapter.num_requests += 1
        self.num_requests += 1

    def release(self, adapter: Adapter) -> None:
        adapter.num_requests -= 1
        self.num_requests -= 1
        self._drop_if_unused(adapter)

    def _drop_if_unused(self, adapter: Adapter) -> None:
        if adapter.unloaded and adapter.num_requests == 0:
            self.host.pop(adapter.uid, None)
            self._pending.discard(adapter)  # a read still running is dropped when it ends
            for s, held in enumerate(self.slots):
                if held is adapter and self.slot_pins[s] == 0:
                    self.slots[s] = None
                    self.load_slot(s, None)

    # -- host tier -----------------------------------------------------------------------------
    def _keep_host(self, uid: int, weights: SlotImage) -> None:
        self.host[uid] = weights
        self.host.move_to_end(uid)
        while len(self.host) > self.config.max_cpu_loras:
            self.host.popitem(last=False)

    def _host_weights(self, adapter: Adapter) -> SlotImage | None:
        """The adapter's weights if in host memory; otherwise start reading them (once)."""
        weights = self.host.get(adapter.uid)
        if adapter.error is not None:
            return None
        if weights is not None:
            self.host.move_to_end(adapter.uid)
            return weights
        if adapter._future is None:
            adapter._future = self._reader.submit(self._read_packed, adapter.path)
            self._pending.add(adapter)
            self.num_reads += 1
        if not adapter._future.done():
            return None
        future, adapter._future = adapter._future, None
        self._pending.discard(adapter)
        try:
            weights = future.result()
        except AdapterError as e:  # the folder changed or vanished since it was loaded
            adapter.error = f"reloading adapter {adapter.name!r} failed: {e}"
            self.num_errors += 1
            log.error("lmq: %s", adapter.error)
            return None
        self._keep_host(adapter.uid, weights)
        return weights

    def wait_for_reads(self, timeout: float) -> None:
        """Block until a pending disk read finishes (an idle engine waiting only for adapters)."""
        futures = [a._future for a in self._pending if a._future is not None]
        if futures:
            wait(futures, timeout, return_when=FIRST_COMPLETED)


    # -- slots ---------------------------------------------------------------------------------
    def slot_of(self, adapter: Adapter) -> int | None:
        for s, held in enumerate(self.slots):
            if held is adapter:
                return s
        return None

    def can_activate(self, adapter: Adapter) -> bool:
        """Whether a sequence of this adapter can run this step (pure check except that a
        host-tier miss starts reading the adapter in the background)."""
        if self.slot_of(adapter) is not None:
            return True
        return self._free_slot() is not None and self._host_weights(adapter) is not None

    def activate(self, seq_id: int, adapter: Adapter) -> int:
        """Pin the adapter's slot for a running sequence, loading it into a slot if needed."""
        slot = self.slot_of(adapter)
        if slot is None:
            slot = self._free_slot()
            weights = self._host_weights(adapter)
            assert slot is not None and weights is not None, "activate() without can_activate()"
            self.slots[slot] = adapter
            self.load_slot(slot, weights)
            self.num_slot_loads += 1
        self.pins[seq_id] = slot
        self.slot_pins[slot] += 1
        self.slot_lru.move_to_end(slot)
        return slot

    def deactivate(self, seq_id: int) -> None:
        """A sequence stopped running (finished, aborted, preempted): unpin its slot."""
        slot = self.pins.pop(seq_id, None)
        if slot is None:
            return
        self.slot_pins[slot] -= 1
        adapter = self.slots[slot]
        if adapter is not None and adapter.unloaded and adapter.num_requests == 0 and self.slot_pins[slot] == 0:
            self.slots[slot] = None
            self.load_slot(slot, None)

    def pinned_slot(self, seq_id: int) -> int:
        return self.pins.get(seq_id, -1)

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently pinned slot no running sequence pins."""
        for s, held in enumerate(self.slots):
            if held is None:
                return s
        for s in self.slot_lru:
            if self.slot_pins[s] == 0:
                return s
        return None

    def check_integrity(self) -> None:
        counts = [0] * len(self.slots)
        for s in self.pins.values():
            counts[s] += 1
        assert counts == self.slot_pins, f"slot pins {self.slot_pins} != pinned sequences {counts}"
        held = [a.uid for a in self.slots if a is not None]
        assert len(held) == len(set(held)), "an adapter holds two slots"

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
