"""AutoAWQ's "GEMM" layout for 4-bit weights with per-group zero points, as vLLM and
transformers read it. For a linear layer with weight W [out, in] and groups of `g` input
channels:

    qweight [in, out / 8] int32     eight 4-bit values per int32, along the output dim
    qzeros  [in / g, out / 8] int32 the zero point of each (group, output) pair, packed alike
    scales  [in / g, out] float16
    W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]

Inside one int32 the nibbles are interleaved: nibble k (bits 4k .. 4k+3) of packed column c
holds output column 8c + AWQ_ORDER[k], so that the kernels can unpack pairs with one shift:

    nibble:          0  1  2  3  4  5  6  7
    output column:   0  2  4  6  1  3  5  7   (+ 8c)
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column (within 8) stored in nibble k


def _shifts(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[8] bit shift of output column j (within 8): 4 * AWQ_ORDER.index(j) = 4 * (j // 2 + 4 * (j % 2)),
    computed on the device (a host-to-device copy is not allowed inside a CUDA graph capture)."""
    j = torch.arange(PACK, device=device, dtype=dtype)
    return BITS * (j // 2 + 4 * (j % 2))


def pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in [0, 15] -> [rows, cols / 8] int32 in AWQ's order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"AWQ packs {PACK} values per int32: {cols} columns is not a multiple of {PACK}")
    v = values.to(torch.int64).view(rows, cols // PACK, PACK)
    shifts = _shifts(values.device, torch.int64)
    packed = (v << shifts).sum(-1)  # [rows, cols / 8], < 2**32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same bits as int32


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 8] int32 -> [rows, cols] int32 in [0, 15] (inverse of `pack`)."""
    shifts = _shifts(packed.device, torch.int32)
    return ((packed[:, :, None] >> shifts) & 0xF).flatten(1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The AutoAWQ tensors of one linear -> W^T [in, out] in `dtype` (what x @ W^T needs)."""
    return dequantize_values(unpack(qweight), unpack(qzeros), scales, group_size, dtype)


def dequantize_values(q: torch.Tensor, z: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Unpacked q [in, out], zero points z [in / g, out] and scales [in / g, out] -> W^T [in, out]
    in `dtype`: (q - z) * s in float32, rounded once."""
    z = z.repeat_interleave(group_size, dim=0)  # [in, out]
    s = scales.float().repeat_interleave(group_size, dim=0)  # [in, out]
    return ((q - z).float() * s).to(dtype)
