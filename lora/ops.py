"""Batched LoRA in plain torch: the per-projection slot stacks and the delta op (the oracle for
turbomind's kernels).

One fused projection (q|k|v, gate|up, o, down) of one layer keeps every slot's adapter in two
stacks, rank-major so that the first `r` ranks of all slots are one contiguous block:

    a: [R, S, P, in]    rank j of part p of slot s          (R = max_lora_rank, S = slots,
    b: [R, S, P, out]   block-diagonal over parts: part p    P = parts of the fused matrix)
                        only fills its own output rows

For a step whose adapters have rank <= r, each token's delta is

    h = x @ a[:r].view(r*S*P, in).T          [T, r*S*P]   every slot's down-projection
    h *= onehot(slot of token)               zero all but the token's own slot
    y = h @ b[:r].view(r*S*P, out)           [T, out]

Two matmuls whatever the mix of adapters: no Python loop over requests or adapters, and the
shapes depend only on (T, r), so a decode step captures into a CUDA graph. Rows of base-model
tokens are left out of eager steps (`rows`); a graph step masks them to zero instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LoRAStack:
    """The slot stacks of one fused projection."""

    def __init__(self, parts: list[int], in_features: int, max_rank: int, num_slots: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.parts = parts  # output rows of each part, in order
        self.offsets = [sum(parts[:i]) for i in range(len(parts))]
        out = sum(parts)
        self.a = torch.zeros(max_rank, num_slots, len(parts), in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_rank, num_slots, len(parts), out, dtype=dtype, device=device)

    def clear(self, slot: int) -> None:
        self.a[:, slot].zero_()
        self.b[:, slot].zero_()

    def set(self, slot: int, part: int, a: torch.Tensor, bt: torch.Tensor) -> None:
        """a: [r, in], bt: [r, out_part] (B transposed, scale folded in) -> the slot's part,
        ranks [0, r). From pinned host memory the copies do not block the host."""
        r, lo = a.shape[0], self.offsets[part]
        self.a[:r, slot, part].copy_(a, non_blocking=True)
        self.b[:r, slot, part, lo:lo + self.parts[part]].copy_(bt, non_blocking=True)


@dataclass
class LoRAMetadata:
    """Which slot each token of a step uses.

    rank: ranks to compute (>= the largest rank among the step's adapters; 0: no LoRA token).
    onehot: [T', S] in the model dtype, one row per LoRA-computed token (all zero for a base
        token in a graph step).
    rows: [T'] int64 indices of those tokens in the step, or None when T' is the whole step.
    slots: [T'] int64 slot of each of those tokens (-1: base), what turbomind's gather kernels
        read instead of the one-hot; None where only the one-hot is built.
    """

    rank: int
    onehot: torch.Tensor
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None


def add_lora(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, meta: LoRAMetadata) -> torch.Tensor:
    """y: [T, out] (the base projection of x: [T, in]) plus each token's adapter delta."""
    r = meta.rank
    xs = x if meta.rows is None else x.index_select(0, meta.rows)  # [T', in]
    a = stack.a[:r]  # [r, S, P, in]
    s, p = a.shape[1], a.shape[2]
    h = xs @ a.reshape(-1, a.shape[-1]).T  # [T', r*S*P]
    h = (h.view(-1, r, s, p) * meta.onehot[:, None, :, None]).view(h.shape)
    delta = h @ stack.b[:r].reshape(r * s * p, -1)  # [T', out]
    if meta.rows is None:
        return y + delta
    return y.index_add(0, meta.rows, delta)
