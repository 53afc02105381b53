"""torch_engine.ops against plain formulas written out here (float64, loops over tokens and
sequences), on fresh random inputs: these ops are the oracles the CUDA kernels are tested against,
so they are checked first against arithmetic that shares none of their code.

Attention metadata is built by `_step` as torch_engine builds it (`AttentionMetadata.from_step`):
decode rows first, then prefill chunks padded to the longest one; here block tables are padded
with a scratch block. Attention reads the step's K/V from the cache: `_attend` writes them first,
as the model's `rotary_write_kv` does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from conftest import SEED
from lora.ops import LoRAMetadata, LoRAStack
from torch_engine import ops
from torch_engine.attention_metadata import AttentionMetadata

# Per-dtype tolerance of an op's output against the float64 formula on the same (rounded) inputs:
# |out - expected| <= atol + rtol * max(|expected|, mag), where `mag` (when a test gives it) is the
# sum of the magnitudes of the terms the output adds up (|x| @ |W|^T, |q cos| + |rot(q) sin|):
# rounding errors scale with the terms, so an output that cancels to near zero keeps their error.
# float32: a handful of float32 roundings on values of order 1 (sums of <= 128 products, a softmax)
#   stay well under 1e-5.
# bfloat16: 8 mantissa bits, so one rounding of the output alone is up to 2^-8 = 0.4% relative;
#   the ops also round intermediates (x + residual, the scores, q * cos and rot(q) * sin, the base
#   projection before the LoRA delta) to bfloat16, hence ~2e-2 relative (floor 2e-2 near zero).
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = list(TOL)


def _gen(k: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + k)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, mag: torch.Tensor | None = None) -> None:
    """actual (in `dtype`) within TOL[dtype] of the float64 `expected`; see TOL for `mag`."""
    assert actual.dtype == dtype and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    tol, e = TOL[dtype], expected.double()
    ref = e.abs() if mag is None else torch.maximum(e.abs(), mag.double())
    err = (actual.double() - e).abs()
    bound = tol["atol"] + tol["rtol"] * ref
    worst = int((err / bound).argmax())
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} of {err.numel()} elements off; worst at flat index {worst}: "
        f"got {actual.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g} "
        f"(error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g})")


# -- elementwise and dense ops ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(dtype: torch.dtype) -> None:
    """Row `id` of the table for each token id, bit for bit (repeated ids included)."""
    g = _gen(0)
    weight = _randn(g, 50, 24, dtype=dtype)  # [V, hidden]
    ids = torch.randint(0, 50, (17,), generator=g)
    ids[3] = ids[11]
    out = ops.embedding(ids, weight)  # [T, hidden]
    expected = torch.stack([weight[int(i)] for i in ids])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(dtype: torch.dtype, bias: bool) -> None:
    """x @ W^T (+ b) per token against the float64 sum over the input features; TOL[dtype]."""
    g = _gen(1)
    x, w = _randn(g, 9, 40, dtype=dtype), _randn(g, 24, 40, dtype=dtype) * 0.2  # [T, in], [out, in]
    b = _randn(g, 24, dtype=dtype) if bias else None
    out = ops.linear(x, w, b)  # [T, out]
    expected, mag = torch.empty(9, 24, dtype=torch.float64), torch.empty(9, 24, dtype=torch.float64)
    for t in range(9):
        for o in range(24):
            terms = x[t].double() * w[o].double()  # [in]
            bo = b[o].double() if b is not None else torch.tensor(0.0, dtype=torch.float64)
            expected[t, o], mag[t, o] = terms.sum() + bo, terms.abs().sum() + bo.abs()
    _close(out, expected, dtype, mag)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_adds_each_tokens_lora_delta(dtype: torch.dtype) -> None:
    """linear with a LoRA stack: x W^T + b plus, for a token of slot s, x A_s^T B_s^T * scale;
    nothing for base tokens, and nothing at all when the step's rank is 0; TOL[dtype]."""
    g = _gen(2)
    t, d_in, d_out, slots = 7, 32, 16, 3
    x, w, b = _randn(g, t, d_in, dtype=dtype), _randn(g, d_out, d_in, dtype=dtype) * 0.2, _randn(g, d_out, dtype=dtype)
    stack = LoRAStack([d_out], d_in, max_rank=4, num_slots=slots, dtype=dtype, device="cpu")
    adapters = {}
    for s, r in [(0, 4), (2, 3)]:  # slot 1 stays empty
        a, bm = _randn(g, r, d_in, dtype=dtype) * 0.3, _randn(g, d_out, r, dtype=dtype) * 0.3  # [r, in], [out, r]
        scale = 0.5 + s
        stack.set(s, 0, a, (bm.double() * scale).to(dtype).T)
        adapters[s] = (a.double(), bm.double(), scale)
    tok_slots = [0, -1, 2, 2, 1, 0, -1]
    onehot = (torch.tensor(tok_slots)[:, None] == torch.arange(slots)[None, :]).to(dtype)  # [T, S]
    out = ops.linear(x, w, b, stack, LoRAMetadata(4, onehot))
    base = x.double() @ w.double().T + b.double()  # [T, out]
    base_mag = x.double().abs() @ w.double().abs().T + b.double().abs()
    expected, mag = base.clone(), base_mag.clone()
    for i, s in enumerate(tok_slots):
        if s in adapters:
            a, bm, scale = adapters[s]
            expected[i] += x[i].double() @ a.T @ bm.T * scale
            mag[i] += x[i].double().abs() @ a.abs().T @ bm.abs().T * scale
    _close(out, expected, dtype, mag)
    # rank 0: the step has no adapter token, so the stack is not read at all
    _close(ops.linear(x, w, b, stack, LoRAMetadata(0, onehot)), base, dtype, base_mag)


def _rms_rows(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, row by row, in float64."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    rows = [r / math.sqrt(float((r * r).mean()) + eps) * w64 for r in x64]
    return torch.stack(rows).reshape(x.shape)


def _norm_input(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random rows, a few of them tiny so that eps visibly matters (mean(x^2) ~ 1e-6 ~ eps)."""
    x = torch.randn(*shape, generator=g)
    x.view(-1, shape[-1])[::3] *= 1e-3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype: torch.dtype) -> None:
    """normed = x / sqrt(mean(x^2) + eps) * w in float64, over the last dim of [T, H, D] too (the
    q/k norm); the residual returned is x itself, bit for bit; TOL[dtype]."""
    g, eps = _gen(3), 1e-6
    for shape in [(11, 48), (5, 3, 32)]:
        x, w = _norm_input(g, shape, dtype), _randn(g, shape[-1], dtype=dtype) + 1.0
        normed, res = ops.rms_norm(x, w, eps)
        _close(normed, _rms_rows(x, w, eps), dtype)
        assert torch.equal(res, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype: torch.dtype) -> None:
    """With a residual: s = x + residual is normed (float64 formula on s, TOL[dtype]) and returned
    as the new residual (TOL[dtype]: the op adds in the model dtype)."""
    g, eps = _gen(4), 1e-5
    x, res, w = _norm_input(g, (13, 64), dtype), _norm_input(g, (13, 64), dtype), _randn(g, 64, dtype=dtype)
    normed, new_res = ops.rms_norm(x, w, eps, res)
    s = x.double() + res.double()  # [T, hidden]
    _close(new_res, s, dtype)
    _close(normed, _rms_rows(s, w, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    """[gate | up] -> gate / (1 + exp(-gate)) * up in float64; TOL[dtype]."""
    g = _gen(5)
    x = _randn(g, 6, 2 * 40, dtype=dtype) * 3  # [T, 2I]
    out = ops.silu_and_mul(x)  # [T, I]
    expected = torch.empty(6, 40, dtype=torch.float64)
    for t in range(6):
        for i in range(40):
            gate, up = float(x[t, i]), float(x[t, 40 + i])
            expected[t, i] = gate / (1 + math.exp(-gate)) * up
    _close(out, expected, dtype)


# -- rotary --------------------------------------------------------------------------------------
def _inv_freq(d: int, theta: float) -> torch.Tensor:
    """[D / 2] float64: theta^(-2i / D), the default rope."""
    return theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)


def _cos_sin(inv_freq: torch.Tensor, max_len: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """[max_len, 2, D] like the model's table (cos | sin, each over the two halves), here from
    float64 angles so the table holds correctly rounded values."""
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [max_len, D / 2]
    ang = torch.cat((ang, ang), dim=-1)
    return (torch.stack((ang.cos(), ang.sin()), dim=1) * scaling).to(dtype)


def _rotate_pairs(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair (x_i, x_{i + D/2}) as the complex number x_i + j x_{i+D/2}, times
    scaling * exp(j * pos * inv_freq_i); float64. x: [T, H, D] -> (rotated, magnitude of the two
    terms of each output: |x_i cos| + |x_{i+D/2} sin|, |x_i sin| + |x_{i+D/2} cos|)."""
    half = x.shape[-1] // 2
    x64 = x.double()
    out, mag = torch.empty_like(x64), torch.empty_like(x64)
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            c, s = math.cos(p * float(inv_freq[i])), math.sin(p * float(inv_freq[i]))
            z = torch.complex(x64[t, :, i], x64[t, :, half + i]) * (scaling * complex(c, s))
            out[t, :, i], out[t, :, half + i] = z.real, z.imag
            a, b = x64[t, :, i].abs(), x64[t, :, half + i].abs()
            mag[t, :, i], mag[t, :, half + i] = scaling * (a * abs(c) + b * abs(s)), scaling * (a * abs(s) + b * abs(c))
    return out, mag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "h", "hkv", "theta", "scaling"),
                         [(32, 4, 4, 10000.0, 1.0), (64, 4, 2, 500000.0, 1.0), (128, 4, 1, 10000.0, 1.25)])
def test_rotary(dtype: torch.dtype, d: int, h: int, hkv: int, theta: float, scaling: float) -> None:
    """q and k rotated pair by pair (i, i + D/2) at each token's own position (unordered, repeated,
    up to 511) against the complex-number formula; TOL[dtype]."""
    g = _gen(6 + d)
    t, max_len = 10, 512
    q, k = _randn(g, t, h, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype)  # [T, H, D], [T, Hkv, D]
    positions = torch.randint(0, max_len, (t,), generator=g)
    positions[:3] = torch.tensor([0, 1, max_len - 1])
    positions[5] = positions[7]
    inv_freq = _inv_freq(d, theta)
    qr, kr = ops.rotary(positions, q, k, _cos_sin(inv_freq, max_len, scaling, dtype))
    for actual, x in [(qr, q), (kr, k)]:
        expected, mag = _rotate_pairs(x, positions, inv_freq, scaling)
        _close(actual, expected, dtype, mag)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_write_kv_is_rotary_then_write_kv(dtype: torch.dtype) -> None:
    """The fused op: q rotated as `rotary` rotates it, and the rotated k (v as given) in the
    cache at each token's slot, bit for bit against the two ops one after the other."""
    g, t, h, hkv, d, bs, nblocks = _gen(8), 9, 4, 2, 32, 4, 5
    q, k, v = _randn(g, t, h, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype)
    positions = torch.randint(0, 64, (t,), generator=g)
    slots = torch.randperm(nblocks * bs, generator=g)[:t]
    cos_sin = _cos_sin(_inv_freq(d, 10000.0), 64, 1.0, dtype)
    caches = _randn(g, 2, nblocks, bs, hkv, d, dtype=dtype)
    fused, expected = caches.clone(), caches.clone()
    qf = ops.rotary_write_kv(positions, q, k, v, cos_sin, fused[0], fused[1], slots)
    qr, kr = ops.rotary(positions, q, k, cos_sin)
    ops.write_kv(kr, v, expected[0], expected[1], slots)
    assert torch.equal(qf, qr) and torch.equal(fused, expected)


# -- the blocked KV cache --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "hkv", "d"), [(4, 2, 32), (16, 1, 64)])
def test_write_kv(dtype: torch.dtype, block_size: int, hkv: int, d: int) -> None:
    """Each token's k / v lands exactly in cache[slot // bs, slot % bs]; every other entry of
    both caches is untouched (whole caches compared with a copy, bit for bit)."""
    g = _gen(7 + block_size)
    nblocks, t = 6, 2 * block_size + 3
    k_cache, v_cache = _randn(g, nblocks, block_size, hkv, d, dtype=dtype), _randn(g, nblocks, block_size, hkv, d,
                                                                                   dtype=dtype)
    k, v = _randn(g, t, hkv, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype)  # [T, Hkv, D]
    slots = torch.randperm(nblocks * block_size, generator=g)[:t]  # distinct, scattered over blocks
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    for i, s in enumerate(slots.tolist()):
        k_exp[s // block_size, s % block_size] = k[i]
        v_exp[s // block_size, s % block_size] = v[i]
    ops.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)


# -- attention -----------------------------------------------------------------------------------
@dataclass
class _Seq:
    """One sequence of a step: `start` tokens already in the cache, `n` new ones."""

    start: int
    n: int
    blocks: list[int]  # its block table (may hold more blocks than it uses yet)


def _step(seqs: list[_Seq], block_size: int, scratch: int) -> tuple[AttentionMetadata, list[_Seq]]:
    """AttentionMetadata for the step, and the step's order (decodes first)."""
    decodes, prefills = [s for s in seqs if s.n == 1], [s for s in seqs if s.n > 1]
    order = decodes + prefills
    slots = [s.blocks[p // block_size] * block_size + p % block_size for s in order
             for p in range(s.start, s.start + s.n)]
    max_q = max((s.n for s in prefills), default=0)
    pad_index, query_pos, unpad, off = [], [], [], 0
    for i, s in enumerate(prefills):
        js = [min(j, s.n - 1) for j in range(max_q)]  # padded queries repeat the chunk's last one
        pad_index.append([off + j for j in js])
        query_pos.append([s.start + j for j in js])
        unpad.extend(i * max_q + j for j in range(s.n))
        off += s.n

    def tables(group: list[_Seq]) -> torch.Tensor:  # [B, nb], padded with the scratch block
        nb = max((-(-(s.start + s.n) // block_size) for s in group), default=0)
        rows = [s.blocks[:nb] + [scratch] * (nb - len(s.blocks[:nb])) for s in group]
        return torch.tensor(rows, dtype=torch.int64).view(len(group), nb)

    def idx(x: list, *shape: int) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int64).view(*shape)

    meta = AttentionMetadata(
        slot_mapping=idx(slots, -1), num_decode_tokens=len(decodes),
        decode_block_tables=tables(decodes), decode_context_lens=idx([s.start + 1 for s in decodes], -1),
        prefill_block_tables=tables(prefills), prefill_pad_index=idx(pad_index, len(prefills), max_q),
        prefill_query_pos=idx(query_pos, len(prefills), max_q), prefill_unpad_index=idx(unpad, -1))
    return meta, order


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
    """The step's k / v written at meta.slot_mapping, then `ops.attention` over the cache."""
    ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return ops.attention(q, k_cache, v_cache, meta, scale, window)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               order: list[_Seq], scale: float, window: int | None) -> torch.Tensor:
    """Per sequence: keys/values of positions < start read from the cache (as it was before the
    step) through the block table position by position, this step's k / v for the rest; KV heads
    repeated for GQA (query head h reads KV head h // G); softmax(q k^T * scale) over keys j with
    pos - window < j <= pos, in float64. q: [T, H, D] -> [T, H, D]."""
    bs, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    out, off = torch.empty(q.shape, dtype=torch.float64), 0
    for s in order:
        old = [(s.blocks[p // bs], p % bs) for p in range(s.start)]
        keys = torch.cat([torch.stack([k_cache[b, o] for b, o in old]) if old else k[:0], k[off:off + s.n]])
        vals = torch.cat([torch.stack([v_cache[b, o] for b, o in old]) if old else v[:0], v[off:off + s.n]])
        keys = keys.double().repeat_interleave(group, dim=1)  # [L, H, D]
        vals = vals.double().repeat_interleave(group, dim=1)
        for i in range(s.n):
            p = s.start + i
            j = torch.arange(p + 1)
            allowed = j > p - window if window is not None else torch.ones_like(j, dtype=torch.bool)
            scores = torch.einsum("hd,lhd->hl", q[off + i].double(), keys[:p + 1]) * scale  # [H, p + 1]
            scores = scores.masked_fill(~allowed[None, :], -math.inf)
            out[off + i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), vals[:p + 1])
        off += s.n
    return out


def _layout(g: torch.Generator, shape: list[tuple[int, int]], block_size: int) -> tuple[list[_Seq], int]:
    """Sequences (start, n) over blocks shuffled across the whole cache (non-contiguous, in no
    order); some tables hold an unused block past the sequence's end. Returns them and the
    cache's block count (the last block being the scratch one)."""
    need = [-(-(st + n) // block_size) + i % 2 for i, (st, n) in enumerate(shape)]
    num_blocks = sum(need) + 3  # a few blocks nobody owns, holding garbage like the scratch block
    perm = torch.randperm(num_blocks - 1, generator=g).tolist()
    seqs, k = [], 0
    for (st, n), nb in zip(shape, need):
        seqs.append(_Seq(st, n, perm[k:k + nb]))
        k += nb
    return seqs, num_blocks


def _run(shape: list[tuple[int, int]], *, block_size: int, h: int, hkv: int, d: int, window: int | None,
         dtype: torch.dtype, seed: int, device: str = "cpu") -> None:
    """Inputs drawn on the CPU, `ops.attention` run on `device`, compared on the CPU."""
    g = _gen(seed)
    seqs, num_blocks = _layout(g, shape, block_size)
    # The whole cache starts as random garbage: a position read that the masks should hide shows.
    k_cache = _randn(g, num_blocks, block_size, hkv, d, dtype=dtype)  # [num_blocks, bs, Hkv, D]
    v_cache = _randn(g, num_blocks, block_size, hkv, d, dtype=dtype)
    meta, order = _step(seqs, block_size, scratch=num_blocks - 1)
    t = sum(s.n for s in seqs)
    q, k, v = _randn(g, t, h, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype), _randn(g, t, hkv, d, dtype=dtype)
    scale = d ** -0.5 * 1.5  # sharper than uniform, so a wrongly included key moves the output
    expected = _reference(q, k, v, k_cache.clone(), v_cache.clone(), order, scale, window)
    k_written, v_written, off = k_cache.clone(), v_cache.clone(), 0
    for s in order:  # position p of a sequence lives at (blocks[p // bs], p % bs)
        for i, p in enumerate(range(s.start, s.start + s.n)):
            k_written[s.blocks[p // block_size], p % block_size] = k[off + i]
            v_written[s.blocks[p // block_size], p % block_size] = v[off + i]
        off += s.n
    if device != "cpu":
        meta = dataclasses.replace(meta, **{f.name: getattr(meta, f.name).to(device)
                                            for f in dataclasses.fields(meta) if f.type == "torch.Tensor"})
        q, k, v, k_cache, v_cache = (x.to(device) for x in (q, k, v, k_cache, v_cache))
    out = _attend(q, k, v, k_cache, v_cache, meta, scale, window)  # [T, H, D]
    _close(out.cpu(), expected, dtype)
    assert torch.equal(k_cache.cpu(), k_written) and torch.equal(v_cache.cpu(), v_written)


# (start, n) per sequence: decodes at contexts 1, a block boundary, several blocks; a fresh prompt;
# a chunk continuing mid-block (chunked prefill); a chunk after a block-aligned prefix hit.
def _mixed(bs: int) -> list[tuple[int, int]]:
    return [(0, 1), (3 * bs + 2, 5), (bs - 1, 1), (0, 2 * bs + 3), (2 * bs + 5, 1), (bs, bs // 2 + 1),
            (bs + 1, 1), (0, 3)]


ATTN_CASES = [  # block_size, H, Hkv, D, window
    (4, 4, 4, 32, None),
    (16, 4, 2, 64, None),
    (4, 8, 2, 64, 7),
    (16, 4, 1, 32, 21),
    (16, 2, 1, 128, 13),
    (4, 2, 2, 32, 1),  # window 1: each query sees only itself
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block_size", "h", "hkv", "d", "window"), ATTN_CASES)
def test_attention_mixed_step(dtype: torch.dtype, block_size: int, h: int, hkv: int, d: int,
                              window: int | None) -> None:
    """Decodes and prefill chunks in one step over shuffled block tables, against the explicit
    per-sequence float64 softmax (GQA, causal + window); the step's k / v end up in the cache; TOL[dtype]."""
    _run(_mixed(block_size), block_size=block_size, h=h, hkv=hkv, d=d, window=window, dtype=dtype,
         seed=100 + block_size + d + (window or 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["decode_only", "prefill_only"])
def test_attention_single_kind_step(dtype: torch.dtype, kind: str) -> None:
    """A step of decodes only (no prefill rows, empty prefill tables) and one of prefill chunks only;
    same reference and TOL[dtype]."""
    shape = [(0, 1), (9, 1), (22, 1), (4, 1)] if kind == "decode_only" else [(0, 9), (12, 2), (5, 6)]
    _run(shape, block_size=4, h=4, hkv=2, d=32, window=6, dtype=dtype, seed=200 + len(kind))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_chunked_prefill_then_decode(dtype: torch.dtype) -> None:
    """One sequence through three steps (chunks of 7 and 6, one decode) next to another sequence,
    with each step's keys coming from the cache the previous steps wrote: the outputs equal one
    causal (window 9) attention over all 14 positions at once; TOL[dtype]."""
    g, bs, h, hkv, d, window, scale = _gen(300), 4, 4, 2, 32, 9, 32 ** -0.5
    num_blocks = 12
    k_cache, v_cache = _randn(g, num_blocks, bs, hkv, d, dtype=dtype), _randn(g, num_blocks, bs, hkv, d, dtype=dtype)
    blocks = torch.randperm(num_blocks - 1, generator=g).tolist()
    a_blocks, b_blocks = blocks[:4], blocks[4:8]
    q, k, v = _randn(g, 14, h, d, dtype=dtype), _randn(g, 14, hkv, d, dtype=dtype), _randn(g, 14, hkv, d, dtype=dtype)
    whole = _reference(q, k, v, k_cache, v_cache, [_Seq(0, 14, a_blocks)], scale, window)  # [14, H, D]
    outs = []
    for start, n in [(0, 7), (7, 6), (13, 1)]:
        # a neighbour of two new tokens (over garbage context) shares each step
        other = _Seq(start, 2, b_blocks)
        meta, order = _step([_Seq(start, n, a_blocks), other], bs, scratch=num_blocks - 1)
        qo, ko, vo = _randn(g, 2, h, d, dtype=dtype), _randn(g, 2, hkv, d, dtype=dtype), _randn(g, 2, hkv, d,
                                                                                                 dtype=dtype)
        first = order[0].blocks is a_blocks
        qs = torch.cat([q[start:start + n], qo] if first else [qo, q[start:start + n]])
        ks = torch.cat([k[start:start + n], ko] if first else [ko, k[start:start + n]])
        vs = torch.cat([v[start:start + n], vo] if first else [vo, v[start:start + n]])
        out = _attend(qs, ks, vs, k_cache, v_cache, meta, scale, window)
        outs.append(out[:n] if first else out[2:])
    _close(torch.cat(outs), whole, dtype)


def test_attention_masks_per_window_on_one_meta() -> None:
    """Layers with different windows share one step's metadata (and its mask cache): each call
    gets its own window's result; float32 TOL."""
    g, bs, h, hkv, d = _gen(400), 4, 2, 1, 32
    seqs, num_blocks = _layout(g, _mixed(bs), bs)
    meta, order = _step(seqs, bs, scratch=num_blocks - 1)
    t = sum(s.n for s in seqs)
    k_cache, v_cache = _randn(g, num_blocks, bs, hkv, d), _randn(g, num_blocks, bs, hkv, d)
    q, k, v = _randn(g, t, h, d), _randn(g, t, hkv, d), _randn(g, t, hkv, d)
    before = k_cache.clone(), v_cache.clone()
    for window in [None, 5, 2, None, 5]:
        out = _attend(q, k, v, k_cache, v_cache, meta, d ** -0.5, window)
        _close(out, _reference(q, k, v, *before, order, d ** -0.5, window), torch.float32)
