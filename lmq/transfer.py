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
