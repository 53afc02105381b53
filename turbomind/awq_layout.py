"""turbomind's own layout of an AWQ linear (repacked once, at load time, from AutoAWQ's GEMM
layout: quant_tools/awq_format.py), read by kernels/awq_mma.cu.

AutoAWQ packs eight outputs of one input per int32, so a tensor-core kernel has to gather each
mma B fragment nibble by nibble. Here every 32-bit word holds exactly the eight 4-bit weights
one lane needs for one 16 (inputs) x 16 (outputs) block of W [in, out], in the order two
`lop3`s turn into its four bf16x2 / half2 fragment registers (the "magic number" conversion:
(q & 0x000f000f) | 0x64006400 is the half pair (1024 + q_lo, 1024 + q_hi); 0x4300 gives bf16's
128 + q). For lane l = 4 g + t (mma's groupID g, thread-in-group t) and block (kb, cb):

    nibble p = 4 h + 2 nh + kh  (h, nh, kh in {0, 1})  holds  W[16 kb + 8 kh + 2 t + h, 16 cb + 8 nh + g]

so `(word >> 4 p') & 0x000f000f` for p' = 2 nh + kh is the fragment register of output half
nh (an n8 tile), input half kh: its low half is input 2t, its high half 2t + 1, as mma's "col"
B operand wants. Words are stored so that a lane reads four blocks (64 outputs) in one 16-byte
load and a warp's 32 lanes read 512 contiguous bytes:

    qweight [in / 16, out / 64, 32 (lane), 4 (block)] int32, viewed as [in / 16, 2 out]
    qzeros  [in / g, out / 64, 8 (g), 8 (= 2 block + nh) nibbles] as int32 [in / g, out / 8]
    scales  [in / g, out / 64, 8 (g), 8 (= 2 block + nh)] in the model dtype, viewed as [in / g, out]

Lanes 4g .. 4g + 3 share their columns, so one 4-byte zero word and one 16-byte scale load
per group give a lane the zero points and scales of its eight n8 columns.
"""

from __future__ import annotations

import torch

from quant_tools.awq_format import dequantize_values, pack, unpack

GROUP_COLS = 64  # outputs of one lane's 16-byte load (4 blocks); out must be a multiple
MMA_GROUP_MULTIPLE = 32  # awq_mma.cu's smallest BK: a group never ends inside a pipeline stage


def supported(in_features: int, out_features: int, group_size: int) -> bool:
    return out_features % GROUP_COLS == 0 and group_size % MMA_GROUP_MULTIPLE == 0 and in_features % group_size == 0


def _nibbles_to_words(v: torch.Tensor) -> torch.Tensor:
    """[..., 8] ints in [0, 15] -> [...] int32 with v[..., p] in bits 4p .. 4p + 3."""
    shifts = 4 * torch.arange(8, device=v.device, dtype=torch.int64)
    w = (v.to(torch.int64) << shifts).sum(-1)  # < 2**32
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)  # the same bits as int32


def _words_to_nibbles(w: torch.Tensor) -> torch.Tensor:
    shifts = 4 * torch.arange(8, device=w.device, dtype=torch.int32)
    return (w[..., None] >> shifts) & 0xF


def pack_weights(q: torch.Tensor) -> torch.Tensor:
    """q [in, out] ints in [0, 15] -> qweight [in / 16, 2 out] int32 (the layout above)."""
    k, n = q.shape
    # q[16 kb + 8 kh + 2 t + h, 64 cg + 16 w + 8 nh + g] -> [kb, cg, g, t, w, h, nh, kh]
    v = q.reshape(k // 16, 2, 4, 2, n // 64, 4, 2, 8).permute(0, 4, 7, 2, 5, 3, 6, 1)
    return _nibbles_to_words(v.reshape(k // 16, n // 64, 32, 4, 8)).reshape(k // 16, 2 * n)


def unpack_weights(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_weights: [in / 16, 2 out] int32 -> q [in, out] int32."""
    kb, n = qweight.shape[0], qweight.shape[1] // 2
    v = _words_to_nibbles(qweight).reshape(kb, n // 64, 8, 4, 4, 2, 2, 2)  # [kb, cg, g, t, w, h, nh, kh]
    return v.permute(0, 7, 3, 5, 1, 4, 6, 2).reshape(16 * kb, n)


def _per_lane(t: torch.Tensor) -> torch.Tensor:
    """[G, out] -> [G, out / 64, 8 (g), 8 (2 block + nh)]: column 64 cg + 16 w + 8 nh + g."""
    groups, n = t.shape
    return t.reshape(groups, n // 64, 4, 2, 8).permute(0, 1, 4, 2, 3).reshape(groups, n // 64, 8, 8)


def _from_lane(t: torch.Tensor) -> torch.Tensor:
    """Inverse of _per_lane, from its flat [G, out] view."""
    groups, n = t.shape
    return t.reshape(groups, n // 64, 8, 4, 2).permute(0, 1, 3, 4, 2).reshape(groups, n)


def _zero_points(qzeros: torch.Tensor) -> torch.Tensor:
    """This layout's zero words [G, out / 8] -> z [G, out] (AutoAWQ's column order)."""
    groups, words = qzeros.shape
    return _from_lane(_words_to_nibbles(qzeros).reshape(groups, 8 * words))


def repack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's (qweight [in, out / 8], qzeros [in / g, out / 8], scales [in / g, out]) ->
    this layout's (qweight [in / 16, 2 out], qzeros [in / g, out / 8], scales [in / g, out] in
    `dtype`, the product's type: awq_mma.cu multiplies in it, as torch_engine rounds its
    scales to the model dtype when it loads them)."""
    groups, n = scales.shape
    zeros = _nibbles_to_words(_per_lane(unpack(qzeros))).reshape(groups, n // 8)
    return (pack_weights(unpack(qweight)).contiguous(), zeros.contiguous(),
            _per_lane(scales.to(dtype)).reshape(groups, n).contiguous())


def restore(qweight: torch.Tensor, qzeros: torch.Tensor,
            scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of repack (scales stay in their dtype): back to AutoAWQ's GEMM layout."""
    return pack(unpack_weights(qweight)), pack(_zero_points(qzeros)), _from_lane(scales)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """This layout's tensors -> W^T [in, out] in `dtype`, (q - z) * s rounded once (as
    quant_tools.awq_format.dequantize on the AutoAWQ tensors)."""
    return dequantize_values(unpack_weights(qweight), _zero_points(qzeros), _from_lane(scales), group_size, dtype)
