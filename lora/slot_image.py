"""An adapter laid out as one slot of every LoRA stack, in one host buffer.

Loading a device slot module by module took one small host-to-device transfer per A and B
(224 for a 16-layer model, each into a strided view of its stack) plus a zeroing kernel per
stack. Packed once when the adapter enters the host tier, a load is one transfer of the whole
image into a device staging buffer, then one device copy per stack part. (Measured on an H100,
bench/lora.py: the synchronized slot load took 6.5 ms either way, so the transfers' count was
not what it cost; BENCHMARKS.md.)

The image is rank-major like the stacks (lora/ops.py), one column range per fused projection
of each layer, in layer order and then qkv_proj, o_proj, gate_up_proj, down_proj:

    data: [r, W]   r = the adapter's rank; row j holds rank j of every projection:
                   | A of part 0 (in) | A of part 1 | ... | B^T of part 0 (out_0) | B^T of part 1 | ... |
    W = sum over layers and projections of P * in + out   (the adapter's own size: no padding)

Ranks a module lacks (its rank below the adapter's) and modules the adapter does not target
are zeros, so writing the whole image also clears whatever the slot held before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lora.adapter import PROJECTIONS, LoRAAdapter, module_shape
from lora.ops import LoRAStack

if TYPE_CHECKING:  # lmq imports lora at run time, not the other way round
    from lmq.config import ModelConfig

# Each layer's fused projections in image order, and their peft parts in order: PROJECTIONS
# grouped (it lists each fused projection's parts in part-index order; the model's Linear
# parts, which SlotWriter checks).
FUSED: dict[str, tuple[str, ...]] = {fused: tuple(n for n, (f, _) in PROJECTIONS.items() if f == fused)
                                     for fused, _ in PROJECTIONS.values()}


@dataclass(frozen=True)
class StackSpan:
    """Where one fused projection of one layer sits in the image."""

    layer: int
    fused: str
    parts: tuple[int, ...]  # output rows of each part
    in_features: int
    offset: int  # first column: the parts' A at offset + p * in, their B^T after all the A

    def a_cols(self, part: int) -> slice:
        lo = self.offset + part * self.in_features
        return slice(lo, lo + self.in_features)

    def b_cols(self, part: int) -> slice:
        lo = self.offset + len(self.parts) * self.in_features + sum(self.parts[:part])
        return slice(lo, lo + self.parts[part])

    @property
    def width(self) -> int:
        return len(self.parts) * self.in_features + sum(self.parts)


@dataclass(frozen=True)
class SlotLayout:
    """The image's columns for a base model: every (layer, fused projection) span."""

    spans: tuple[StackSpan, ...]
    width: int

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> SlotLayout:
        spans, offset = [], 0
        for layer in range(cfg.num_layers):
            for fused, names in FUSED.items():
                shapes = [module_shape(cfg, n) for n in names]  # (out, in) of each part
                span = StackSpan(layer, fused, tuple(out for out, _ in shapes), shapes[0][1], offset)
                spans.append(span)
                offset += span.width
        return cls(tuple(spans), offset)

    def module_cols(self, layer: int, name: str) -> tuple[slice, slice]:
        """(A columns, B^T columns) of a peft module (layer, name)."""
        fused, part = PROJECTIONS[name]
        span = self.spans[layer * len(FUSED) + list(FUSED).index(fused)]
        return span.a_cols(part), span.b_cols(part)


@dataclass(frozen=True)
class SlotImage:
    """An adapter packed for one-transfer slot loads (host memory, pinned on a CUDA engine)."""

    path: str
    rank: int
    data: torch.Tensor  # [rank, layout.width] in the model dtype


def pack(adapter: LoRAAdapter, layout: SlotLayout, dtype: torch.dtype, pin: bool = False) -> SlotImage:
    """The adapter's modules copied (and cast to the model dtype) into one [rank, W] buffer."""
    data = torch.zeros(adapter.rank, layout.width, dtype=dtype, pin_memory=pin)
    for (layer, name), m in adapter.modules.items():
        a_cols, b_cols = layout.module_cols(layer, name)
        data[:m.rank, a_cols] = m.a
        data[:m.rank, b_cols] = m.bt
    return SlotImage(adapter.path, adapter.rank, data)


class SlotWriter:
    """Writes images into one slot of every stack of a model: one transfer of the image into a
    device staging buffer (ranks above the image's zeroed), then one device copy per part, all
    issued by one `torch._foreach_copy_` over views made once (a Python loop of 224 copies cost
    about 1.2 ms of host time per load for the 1B shape, measured on meta tensors)."""

    def __init__(self, layout: SlotLayout, stacks: list[LoRAStack], max_rank: int) -> None:
        """stacks: the model's stacks in `layout.spans` order (checked against the spans)."""
        if len(stacks) != len(layout.spans):
            raise ValueError(f"{len(stacks)} LoRA stacks for a layout of {len(layout.spans)} projections")
        for span, stack in zip(layout.spans, stacks):
            if tuple(stack.parts) != span.parts or stack.a.shape[-1] != span.in_features:
                raise ValueError(f"layer {span.layer} {span.fused}: stack parts {stack.parts} x {stack.a.shape[-1]} "
                                 f"do not match the layout's {span.parts} x {span.in_features}")
        self.stacks = stacks
        a = stacks[0].a
        self.staging = torch.zeros(max_rank, layout.width, dtype=a.dtype, device=a.device)  # [R, W]
        # per part of every stack, A [R, in] and B^T [R, out_part]: staging columns -> slot views
        self._sources = [v for span in layout.spans for p in range(len(span.parts))
                         for v in (self.staging[:, span.a_cols(p)], self.staging[:, span.b_cols(p)])]
        self._targets: dict[int, list[torch.Tensor]] = {}

    def _slot_views(self, slot: int) -> list[torch.Tensor]:
        """The slot's part of every stack, ranks [0, R) (the whole slot is rewritten), in _sources' order."""
        if slot not in self._targets:
            self._targets[slot] = [v for stack in self.stacks
                                   for p, (lo, n) in enumerate(zip(stack.offsets, stack.parts, strict=True))
                                   for v in (stack.a[:, slot, p], stack.b[:, slot, p, lo:lo + n])]
        return self._targets[slot]

    def write(self, slot: int, image: SlotImage | None) -> None:
        if image is None:
            for stack in self.stacks:
                stack.clear(slot)
            return
        r = image.rank
        self.staging[:r].copy_(image.data, non_blocking=True)  # from pinned memory: the host does not wait
        if r < self.staging.shape[0]:
            self.staging[r:].zero_()
        torch._foreach_copy_(self._slot_views(slot), self._sources)
