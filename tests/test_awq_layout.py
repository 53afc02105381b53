"""CPU: turbomind's repacked AWQ layout (turbomind/awq_layout.py) holds each weight, zero point
and scale where its docstring says awq_mma.cu's lanes read them, round trips to AutoAWQ's GEMM
tensors, and dequantizes to what AutoAWQ's layout dequantizes to."""

from __future__ import annotations

import pytest
import torch

from quant_tools.awq_format import dequantize, pack
from turbomind import awq_layout


def _random(k: int, n: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // group, n), generator=g)
    s = (0.01 + 0.02 * torch.rand(k // group, n, generator=g)).half()
    return q, z, s


@pytest.mark.parametrize("k, n, group", [(64, 128, 32), (96, 192, 32), (256, 64, 128)])
def test_each_nibble_is_where_its_lane_reads_it(k, n, group):
    """Nibble p = 4h + 2nh + kh of word (kb, cg, lane, w) is W[16kb + 8kh + 2t + h, 64cg + 16w + 8nh + g]
    for lane = 4g + t: checked for every position of a random q, element by element."""
    q, _, _ = _random(k, n, group, seed=k + n)
    words = awq_layout.pack_weights(q).view(k // 16, n // 64, 32, 4)
    for kb in range(k // 16):
        for cg in range(n // 64):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for w in range(4):
                    word = int(words[kb, cg, lane, w]) & 0xFFFFFFFF
                    for p in range(8):
                        h, nh, kh = p >> 2, (p >> 1) & 1, p & 1
                        expected = q[16 * kb + 8 * kh + 2 * t + h, 64 * cg + 16 * w + 8 * nh + g]
                        assert (word >> (4 * p)) & 0xF == expected
    assert torch.equal(awq_layout.unpack_weights(awq_layout.pack_weights(q)), q.int())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_repack_round_trips_and_dequantizes_alike(dtype):
    k, n, group = 256, 320, 64
    q, z, s = _random(k, n, group, seed=7)
    qweight, qzeros = pack(q), pack(z)
    tq, tz, ts = awq_layout.repack(qweight, qzeros, s, dtype)
    assert tq.shape == (k // 16, 2 * n) and tz.shape == qzeros.shape and ts.shape == s.shape and ts.dtype == dtype
    # zero word (G, cg, g) nibble 2w + nh and scale (G, cg, g, 2w + nh) are column 64cg + 16w + 8nh + g's
    zw = tz.view(k // group, n // 64, 8)
    sv = ts.view(k // group, n // 64, 8, 8)
    for gi, cg, g, w, nh in [(0, 0, 0, 0, 0), (1, 2, 5, 3, 1), (3, 4, 7, 1, 0), (2, 1, 3, 2, 1)]:
        col = 64 * cg + 16 * w + 8 * nh + g
        assert (int(zw[gi, cg, g]) >> (4 * (2 * w + nh))) & 0xF == z[gi, col]
        assert sv[gi, cg, g, 2 * w + nh] == s[gi, col].to(dtype)
    back = awq_layout.restore(tq, tz, ts)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], qzeros) and torch.equal(back[2], s.to(dtype))
    assert torch.equal(awq_layout.dequantize(tq, tz, ts, group, dtype),
                       dequantize(qweight, qzeros, s.to(dtype), group, dtype))


def test_supported_shapes():
    assert awq_layout.supported(4096, 6144, 128) and awq_layout.supported(576, 1536, 32)
    assert not awq_layout.supported(4096, 72, 128)  # outputs not a multiple of 64
    assert not awq_layout.supported(4096, 4096, 16)  # groups smaller than a 32-input stage


def test_turbomind_awq_pack_chooses_the_layout(monkeypatch):
    """turbomind.ops.awq_pack: AutoAWQ's layout with float16 scales (what awq_gemv / awq_gemm
    read) unless AWQ_MMA is on and awq_mma takes the shape and dtype; awq_linear tells the two
    apart by qweight's rows."""
    from turbomind import ops as tm

    k, n, group = 128, 192, 64
    q, z, s = _random(k, n, group, seed=3)
    qweight, qzeros, bf16 = pack(q), pack(z), s.to(torch.bfloat16)
    kept = tm.awq_pack(qweight, qzeros, bf16, group)
    assert kept[0] is qweight and kept[1] is qzeros and kept[2].dtype == torch.float16
    assert torch.equal(kept[2].float(), bf16.float())  # exact: bf16 values of fp16 scales fit fp16
    x = torch.zeros(1, k)
    assert tm._autoawq_layout(x, kept[0])
    monkeypatch.setattr(tm, "AWQ_MMA", True)
    packed = tm.awq_pack(qweight, qzeros, bf16, group)
    assert not tm._autoawq_layout(x, packed[0]) and packed[2].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(packed, awq_layout.repack(qweight, qzeros, bf16, torch.bfloat16)))
    assert tm._autoawq_layout(x, tm.awq_pack(qweight, qzeros, bf16.float(), group)[0])  # float32: awq_mma is 16-bit
    assert tm._autoawq_layout(x, tm.awq_pack(qweight, qzeros, bf16, 16)[0])  # groups of 16: too small
