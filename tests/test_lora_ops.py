"""lora.ops against plain per-token formulas: LoRAStack.set / clear lay each slot's adapter out
rank-major and block-diagonal over the fused parts, and add_lora adds to each token exactly
x @ A_s^T @ B_s^T * scale of its own slot s (nothing for a base token), computed here token by
token and part by part in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import SEED
from lora.ops import LoRAMetadata, LoRAStack, add_lora

# Per-dtype tolerance of add_lora against the float64 loop on the same (rounded) weights:
# |out - expected| <= atol + rtol * max(|expected|, mag), mag = |y| + |x| @ |A|^T @ |B|^T * scale,
# the magnitude of the terms summed: rounding errors scale with the terms, so an output that
# cancels to near zero keeps their error.
# float32: two matmuls of <= 48 terms of order 0.1-1, far under 1e-5.
# bfloat16: the stacks hold B * scale rounded to bfloat16 and the op rounds x @ A^T, the delta and
#   y + delta (8 mantissa bits: 2^-8 relative each), hence ~2e-2 relative (floor 2e-2 near zero).
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
DTYPES = list(TOL)

PARTS = [24, 8, 8]  # a fused q|k|v: output rows of each part
D_IN, MAX_RANK, SLOTS = 48, 8, 5


def _gen(k: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + k)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


@dataclass
class _Adapter:
    """One slot's adapter: per targeted part, A [r, in] and B [out_part, r] (dtype-rounded
    values), and its scale."""

    rank: int
    scale: float
    mods: dict[int, tuple[torch.Tensor, torch.Tensor]]


# slot -> (rank, scale, parts targeted); slot 3 is never set; slot 2 targets q and v only.
SPECS = {0: (8, 2.0, [0, 1, 2]), 1: (2, 0.5, [0, 1, 2]), 2: (5, 1.0, [0, 2]), 4: (3, 4.0, [1])}


def _adapters(g: torch.Generator, dtype: torch.dtype, specs: dict = SPECS) -> dict[int, _Adapter]:
    out = {}
    for slot, (r, scale, parts) in specs.items():
        mods = {p: (_randn(g, r, D_IN, dtype=dtype) * 0.3, _randn(g, PARTS[p], r, dtype=dtype) * 0.3) for p in parts}
        out[slot] = _Adapter(r, scale, mods)
    return out


def _load(stack: LoRAStack, slot: int, ad: _Adapter) -> None:
    """What AdapterManager -> load_lora_slot does: clear the slot, then each part's A and
    B^T with the scale folded in."""
    stack.clear(slot)
    for p, (a, b) in ad.mods.items():
        stack.set(slot, p, a, (b.double() * ad.scale).to(a.dtype).T)


def _stack(g: torch.Generator, dtype: torch.dtype) -> tuple[LoRAStack, dict[int, _Adapter]]:
    stack = LoRAStack(PARTS, D_IN, MAX_RANK, SLOTS, dtype, "cpu")
    ads = _adapters(g, dtype)
    for slot, ad in ads.items():
        _load(stack, slot, ad)
    return stack, ads


def _delta(x: torch.Tensor, ad: _Adapter, mag: bool = False) -> torch.Tensor:
    """x: [in] -> [out]: per part, x @ A^T @ B^T * scale in that part's own output rows only
    (mag: the same with every factor's absolute value, for TOL)."""
    out = torch.zeros(sum(PARTS), dtype=torch.float64)
    f = torch.abs if mag else (lambda t: t)
    lo = 0
    for p, n in enumerate(PARTS):
        if p in ad.mods:
            a, b = ad.mods[p]
            out[lo:lo + n] = f(x.double()) @ f(a.double()).T @ f(b.double()).T * ad.scale
        lo += n
    return out


def _onehot(slots: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[T, S] as ModelRunner.lora_onehot builds it: a base token (-1) gets an all-zero row."""
    return (torch.tensor(slots)[:, None] == torch.arange(SLOTS)[None, :]).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, mag: torch.Tensor) -> None:
    """actual (in `dtype`) within TOL[dtype] of the float64 `expected`; see TOL for `mag`."""
    assert actual.dtype == dtype and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    tol, e = TOL[dtype], expected.double()
    err = (actual.double() - e).abs()
    bound = tol["atol"] + tol["rtol"] * torch.maximum(e.abs(), mag.double())
    worst = int((err / bound).argmax())
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} of {err.numel()} elements off; worst at flat index {worst}: "
        f"got {actual.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g} "
        f"(error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g})")


# Every slot appears (the empty slot 3 too), mixed with base tokens (-1), in no order.
TOKEN_SLOTS = [0, -1, 2, 1, 1, 4, -1, 3, 0, 2, -1, 4, 1, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [MAX_RANK, 5])
def test_add_lora_every_token(dtype: torch.dtype, rank: int) -> None:
    """rows=None (a graph step): each token's y plus its own slot's delta; a base token's and an
    empty slot's rows come back bit for bit. rank 5 computes fewer ranks than the stack holds
    (a step without the rank-8 slot 0: its tokens turn base here); TOL[dtype]."""
    g = _gen(0)
    stack, ads = _stack(g, dtype)
    slots = [s if rank >= MAX_RANK or s != 0 else -1 for s in TOKEN_SLOTS]
    t = len(slots)
    x, y = _randn(g, t, D_IN, dtype=dtype), _randn(g, t, sum(PARTS), dtype=dtype)  # [T, in], [T, out]
    out = add_lora(y, x, stack, LoRAMetadata(rank, _onehot(slots, dtype)))  # [T, out]
    expected, mag = y.double().clone(), y.double().abs()
    for i, s in enumerate(slots):
        if s in ads:
            expected[i] += _delta(x[i], ads[s])
            mag[i] += _delta(x[i], ads[s], mag=True)
    _close(out, expected, dtype, mag)
    for i, s in enumerate(slots):
        if s not in ads:
            assert torch.equal(out[i], y[i]), (i, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_lora_rows(dtype: torch.dtype) -> None:
    """rows given (an eager step): only those tokens are computed, each with its own slot's delta
    (TOL[dtype]); tokens outside `rows`, LoRA or not, are returned unchanged bit for bit."""
    g = _gen(1)
    stack, ads = _stack(g, dtype)
    t = len(TOKEN_SLOTS)
    x, y = _randn(g, t, D_IN, dtype=dtype), _randn(g, t, sum(PARTS), dtype=dtype)
    # The runner's rows: the LoRA tokens; plus a subset that leaves some LoRA tokens out and holds
    # a base token whose onehot row is all zero.
    lora_rows = [i for i, s in enumerate(TOKEN_SLOTS) if s >= 0]
    for rows in [lora_rows, [1, 2, 5, 8, 13]]:
        meta = LoRAMetadata(MAX_RANK, _onehot([TOKEN_SLOTS[i] for i in rows], dtype), torch.tensor(rows))
        y_before = y.clone()
        out = add_lora(y, x, stack, meta)
        assert torch.equal(y, y_before)  # the base projection is not modified in place
        expected, mag = y.double().clone(), y.double().abs()
        for i in rows:
            if TOKEN_SLOTS[i] in ads:
                expected[i] += _delta(x[i], ads[TOKEN_SLOTS[i]])
                mag[i] += _delta(x[i], ads[TOKEN_SLOTS[i]], mag=True)
        _close(out, expected, dtype, mag)
        for i in range(t):
            if i not in rows or TOKEN_SLOTS[i] not in ads:
                assert torch.equal(out[i], y[i]), (rows, i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_part_fills_only_its_rows(dtype: torch.dtype) -> None:
    """Block-diagonal over parts: an adapter on part p alone changes only p's output rows (the
    others bit for bit), by x A^T B^T * scale there (TOL[dtype])."""
    g = _gen(2)
    x, y = _randn(g, 6, D_IN, dtype=dtype), _randn(g, 6, sum(PARTS), dtype=dtype)
    offsets = [sum(PARTS[:p]) for p in range(len(PARTS))]
    for p in range(len(PARTS)):
        stack = LoRAStack(PARTS, D_IN, MAX_RANK, SLOTS, dtype, "cpu")
        ad = _adapters(g, dtype, {1: (4, 1.5, [p])})[1]
        _load(stack, 1, ad)
        out = add_lora(y, x, stack, LoRAMetadata(MAX_RANK, _onehot([1] * 6, dtype)))
        lo, hi = offsets[p], offsets[p] + PARTS[p]
        expected = y.double() + torch.stack([_delta(xi, ad) for xi in x])  # [T, out]
        mag = y.double().abs() + torch.stack([_delta(xi, ad, mag=True) for xi in x])
        _close(out[:, lo:hi], expected[:, lo:hi], dtype, mag[:, lo:hi])
        assert torch.equal(out[:, :lo], y[:, :lo]) and torch.equal(out[:, hi:], y[:, hi:]), p


@pytest.mark.parametrize("dtype", DTYPES)
def test_stack_set_layout(dtype: torch.dtype) -> None:
    """set(slot, part, A, B^T) of rank r < max writes a[:r, slot, part] = A and b[:r, slot, part,
    part's rows] = B^T exactly; ranks >= r, other parts' rows and other slots stay zero."""
    g = _gen(3)
    stack = LoRAStack(PARTS, D_IN, MAX_RANK, SLOTS, dtype, "cpu")
    r, slot, part = 3, 2, 1
    a, bt = _randn(g, r, D_IN, dtype=dtype), _randn(g, r, PARTS[part], dtype=dtype)
    stack.set(slot, part, a, bt)
    a_exp = torch.zeros(MAX_RANK, SLOTS, len(PARTS), D_IN, dtype=dtype)  # [R, S, P, in]
    b_exp = torch.zeros(MAX_RANK, SLOTS, len(PARTS), sum(PARTS), dtype=dtype)  # [R, S, P, out]
    for j in range(r):
        a_exp[j, slot, part] = a[j]
        b_exp[j, slot, part, PARTS[0]:PARTS[0] + PARTS[1]] = bt[j]
    assert torch.equal(stack.a, a_exp) and torch.equal(stack.b, b_exp)
    assert stack.offsets == [0, PARTS[0], PARTS[0] + PARTS[1]]


def test_stack_clear_only_that_slot() -> None:
    """clear(s) zeroes slot s in both stacks (all ranks, all parts) and leaves every other slot
    bit for bit; after clear, a lower-rank adapter in that slot computes exactly its own delta
    (no stale higher ranks of the previous one); float32 TOL."""
    g, dtype = _gen(4), torch.float32
    stack, ads = _stack(g, dtype)
    a0, b0 = stack.a.clone(), stack.b.clone()
    stack.clear(0)
    assert not stack.a[:, 0].any() and not stack.b[:, 0].any()
    keep = [s for s in range(SLOTS) if s != 0]
    assert torch.equal(stack.a[:, keep], a0[:, keep]) and torch.equal(stack.b[:, keep], b0[:, keep])
    # slot 0 held rank 8; a rank-2 adapter replaces it
    new = _adapters(g, dtype, {0: (2, 3.0, [0, 2])})[0]
    _load(stack, 0, new)
    x, y = _randn(g, 4, D_IN), _randn(g, 4, sum(PARTS))
    out = add_lora(y, x, stack, LoRAMetadata(MAX_RANK, _onehot([0, 0, 1, -1], dtype)))
    expected, mag = y.double().clone(), y.double().abs()
    for i, ad in [(0, new), (1, new), (2, ads[1])]:
        expected[i] += _delta(x[i], ad)
        mag[i] += _delta(x[i], ad, mag=True)
    _close(out, expected, dtype, mag)
