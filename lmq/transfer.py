"""Host lists onto the device without waiting for it.

Indexing a CUDA tensor with a Python list, or `torch.tensor(values, device="cuda")`, copies
with `non_blocking=False`, which first waits until every kernel already queued has run: one
such copy right after a CUDA-graph replay makes the host sit out the whole forward pass. The
copy below is queued behind that work instead (from pageable memory CUDA stages the bytes
before the call returns, so the temporary host tensor may go at once).
"""

from __future__ import annotations

import torch


def to_device(values: list[int] | list[float], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """values -> a 1-D tensor on `device`; the host does not wait for the device."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class HostCopy:
    """Device tensors copied back to the host behind the work queued so far. `lists()` waits for
    that work only, not for what was queued after it (async scheduling queues the next step
    before reading this one: a plain `.tolist()` would wait for the next step too)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.event = None
        if not tensors or tensors[0].device.type != "cuda":
            # a snapshot there too: the tensors may be views of buffers the next step rewrites
            # (DecodeGraphs' static tokens)
            self.host = [t.clone() for t in tensors]
            return
        self.host = []
        for t in tensors:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            self.host.append(h)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(tensors[0].device))  # that device's, not the current one's

    def lists(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()
        return [t.tolist() for t in self.host]
