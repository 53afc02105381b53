"""turbomind's ops: torch_engine.ops' interface, with the non-GEMM ops as CUDA kernels of
turbomind/kernels (compiled through NVRTC, launched on torch's current stream, so CUDA graphs
capture them). Each launcher checks shapes, dtypes and strides before it launches; the same op
in torch_engine.ops is its oracle (tests/test_gpu_turbomind.py). Dense GEMMs and the embedding
stay on cuBLAS / torch, except decode rows of 16-bit dense linears (gemv.cu); AWQ linears have
W4A16 kernels (awq_gemv, awq_gemm); LoRA deltas gather each token's own adapter (lora.cu).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from lora.ops import LoRAMetadata, LoRAStack
from lora.ops import add_lora as torch_add_lora
from torch_engine import ops as torch_ops
from torch_engine.attention_metadata import AttentionMetadata
from torch_engine.ops import embedding  # noqa: F401  (the embedding gather stays torch's)
from turbomind import awq_layout
from turbomind.launch import (
    AWQ_MMA_BKS,
    AWQ_MMA_ROW_TILES,
    CTYPES,
    DECODE_STAGES,
    HEAD_DIMS,
    HEADS_PER_CTA,
    NULL,
    awq_mma_stages,
    decode_stages,
    device_index,
    i64,
    launch,
)

__all__ = ["add_lora", "argmax_rows", "attention", "attention_backends", "awq_linear", "awq_pack", "dense_gemv",
           "embedding", "linear", "rms_norm", "rotary_write_kv", "sample_race", "silu_and_mul"]

DECODE_THREADS = 128  # decode_attention.cu's block (4 warps)
PREFILL_QUERIES = 32  # prefill_attention.cu's QT
MIN_SPLIT_TOKENS = 32  # split-K: no split of a shorter context (BENCHMARKS.md: batch-1 attention, 192 keys)
DENSE_GEMV_MAX_ROWS = 4  # gemv.cu's largest MR: more rows go to cuBLAS
DENSE_GEMV_ROWS = (1, 2, 4)  # gemv.cu's MR instantiations
# gemv.cu beat cuBLAS at one row on inputs up to 4,096 (the 8B shape's qkv and o: 11% faster) and
# lost on the 14,336 of its down projection (BENCHMARKS.md, H100, 2026-12-07): wider inputs stay on cuBLAS
DENSE_GEMV_MAX_IN = 4096
DENSE_GEMV_WARPS = 8  # gemv.cu's WARPS
DENSE_GEMV_RPW = 2  # outputs per warp (weight rows read side by side)
AWQ_GEMV_MAX_ROWS = 8  # awq_gemv.cu's largest MR: more rows go to awq_gemm
AWQ_GEMV_ROWS = (1, 2, 4, 8)  # awq_gemv.cu's MR instantiations (accumulator rows in registers)
AWQ_KS = 8  # awq_gemv.cu's KS: thread rows per CTA, each over its own inputs
AWQ_COLS = 32  # awq_gemv.cu's COLS: threads per CTA along the packed columns
# packed columns per awq_gemv thread (1, 2 or 4 words per load; 4 with MR <= 4): 1 was the fastest
# on the 8B shape's four linears at 1 and 8 rows (BENCHMARKS.md, H100, 2026-12-07)
AWQ_GEMV_VEC = 1
SAMPLE_THREADS = 1024  # sample.cu's THREADS
ARGMAX_THREADS = 256  # sample.cu's ARGMAX_THREADS
ARGMAX_MAX_PARTS = 32  # argmax_final reduces the parts in one warp
ARGMAX_MIN_CHUNK = 2048  # logits per argmax_part CTA at least (8 per thread)
LORA_SHRINK_THREADS = 256  # lora.cu's SHRINK_THREADS
LORA_SHRINK_ROWS = 8  # lora.cu's SHRINK_ROWS: rows of A per shrink CTA
LORA_EXPAND_THREADS = 128  # lora.cu's EXPAND_THREADS
LORA_MAX_RANK_PARTS = 768  # lora.cu's MAX_RANK_PARTS
AWQ_GEMM_TILE = (64, 128, 32)  # awq_gemm.cu's BM, BN, BK
# more rows go to dequantize + cuBLAS; awq_gemm was the faster up to 2048, the largest size
# bench/awq_gemm.py measured (BENCHMARKS.md, H100, 2026-12-07)
AWQ_GEMM_MAX_ROWS = 2048
AWQ_GEMM_MIN_TILES = 8  # split-K: each split sums at least this many BK tiles
# awq_pack repacks for awq_mma (turbomind/awq_layout.py) only once a GPU run has measured it
# against awq_gemv / awq_gemm (bench/awq_gemm.py) and passed `pytest -m gpu`: not yet
# (BENCHMARKS.md); until then the engine keeps AutoAWQ's layout and the kernels measured on it
AWQ_MMA = False
# awq_mma takes up to this many rows, more go to dequantize + cuBLAS (to be measured with it)
AWQ_MMA_MAX_ROWS = 2048
AWQ_MMA_BN = 256  # awq_mma.cu's BN: 4 warps x 64 outputs
AWQ_MMA_MIN_STAGES = 4  # split-K: each split sums at least this many BK-input stages


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()  # no SDPA here


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"turbomind: {message}")


def _dtype(*tensors: torch.Tensor) -> str:
    dt = tensors[0].dtype
    _check(dt in CTYPES, f"dtype {dt} is not supported (float32, float16, bfloat16)")
    _check(all(t.dtype == dt for t in tensors), f"dtypes differ: {[str(t.dtype) for t in tensors]}")
    _check(all(t.is_cuda and t.device == tensors[0].device for t in tensors), "tensors must be on one CUDA device")
    return CTYPES[dt]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] as [rows, n] with unit inner stride and one row stride (a copy only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_vectors(x2: torch.Tensor, weight: torch.Tensor, res: torch.Tensor | None) -> int | None:
    """rms_norm_vec's 16-byte vectors per thread for rows x2 [rows, n] (1, 2 or 4: at most 256,
    256 and 512 threads), or None where its rules fail (n not a whole number of vectors, rows or
    weight not 16-byte aligned, an empty row, rows past 2,048 vectors) and rms_norm serves instead."""
    size = x2.element_size()
    n = x2.shape[1]
    if not n or (n * size) % 16 or (x2.stride(0) * size) % 16 or any(
            p.data_ptr() % 16 for p in (x2, weight, *([res] if res is not None else []))):
        return None
    nv = n * size // 16
    return 1 if nv <= 256 else 2 if nv <= 512 else 4 if nv <= 2048 else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_engine.ops.rms_norm: (weight * norm(x (+ residual)), x (+ residual))."""
    n = x.shape[-1]
    _check(weight.shape == (n,) and weight.is_contiguous(), f"weight {tuple(weight.shape)} must be [{n}], contiguous")
    t = _dtype(x, weight, *([residual] if residual is not None else []))
    x2 = _rows(x)
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if residual is not None:
        _check(residual.shape == x.shape, f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
        res = residual.reshape(rows, n).contiguous()
        new_res = torch.empty_like(out)
    else:
        res = new_res = NULL  # the kernel norms x alone
    if rows:
        args = (out, new_res, x2, res, weight, n, i64(x2.stride(0)), float(eps))
        if (vpt := _norm_vectors(x2, weight, res if residual is not None else None)) is not None:
            nv = n * x.element_size() // 16
            threads = -(-nv // vpt // 32) * 32
            launch("norm.cu", f"rms_norm_vec<{t}, {vpt}>", x.device, (rows,), (threads,), args)
        else:
            threads = 128 if n <= 512 else 256 if n <= 2048 else 512
            launch("norm.cu", f"rms_norm<{t}>", x.device, (rows,), (threads,), args)
    out = out.view(x.shape)
    return out, (new_res.view(x.shape) if residual is not None else x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] (gate | up) -> [T, I]"""
    _check(x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, f"x {tuple(x.shape)} must be [T, 2 * I], rows"
           " contiguous")
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    if t:
        launch("activation.cu", f"silu_and_mul<{_dtype(x)}>", x.device, ((inter + 255) // 256, t), (256,),
               (out, x, inter, i64(x.stride(0))))
    return out


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary on q and k, k and v written to the cache at slot_mapping, in one kernel.
    q: [T, H, D], k, v: [T, Hkv, D] (inner dim contiguous); caches [blocks, bs, Hkv, D];
    cos_sin [max_len, 2, D] -> rotated q, contiguous [T, H, D]."""
    tokens, heads, d = q.shape
    kv_heads = k.shape[1]
    t = _dtype(q, k, v, cos_sin, k_cache, v_cache)
    _check(k.shape == v.shape == (tokens, kv_heads, d), f"k {tuple(k.shape)}, v {tuple(v.shape)} must be "
           f"[{tokens}, Hkv, {d}]")
    _check(d % 2 == 0 and all(x.stride(-1) == 1 for x in (q, k, v)), "q, k, v need an even, contiguous head dim")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
           and k_cache.shape[2:] == (kv_heads, d), f"caches {tuple(k_cache.shape)} must be contiguous "
           f"[blocks, bs, {kv_heads}, {d}]")
    _check(cos_sin.is_contiguous() and cos_sin.shape[1:] == (2, d), f"cos_sin {tuple(cos_sin.shape)} must be "
           f"contiguous [max_len, 2, {d}]")
    _check(positions.dtype == slot_mapping.dtype == torch.int64 and positions.shape == slot_mapping.shape == (tokens,)
           and positions.is_contiguous() and slot_mapping.is_contiguous(), "positions and slot_mapping must be "
           f"contiguous int64 [{tokens}]")
    out = torch.empty(tokens, heads, d, dtype=q.dtype, device=q.device)
    if tokens:
        items = (heads + kv_heads) * d // 2 + kv_heads * d  # q and k pairs, v elements
        launch("rotary_kv.cu", f"rotary_write_kv<{t}>", q.device, (tokens, -(-items // 256)), (256,),
               (out, k_cache, v_cache, q, k, v, positions, slot_mapping, cos_sin, heads, kv_heads, d,
                *(i64(x.stride(i)) for x in (q, k, v) for i in (0, 1))))
    return out


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_k(num_ctas: int, max_splits: int, device: torch.device) -> int:
    """Split-K factor of a kernel whose output tiles make `num_ctas` CTAs: enough splits for
    about two waves over the SMs, at most `max_splits`; none once the tiles fill the SMs."""
    sms = _num_sms(device_index(device))
    if num_ctas >= sms:
        return 1
    return max(1, min(-(-2 * sms // num_ctas), max_splits))


def decode_splits(num_ctas: int, max_context: int, device: torch.device) -> int:
    """Decode attention's split-K: no split under MIN_SPLIT_TOKENS keys. A function of shapes
    only, so one CUDA graph bucket keeps one value."""
    return split_k(num_ctas, -(-max_context // MIN_SPLIT_TOKENS), device)


def _check_cache_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor) -> str:
    t = _dtype(q, k_cache, v_cache)
    d = q.shape[-1]
    _check(d in HEAD_DIMS, f"head_dim={d} is not supported: must be one of {HEAD_DIMS}")
    _check(q.is_contiguous(), "q must be contiguous [T, H, D]")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
           and k_cache.shape[-1] == d and q.shape[1] % k_cache.shape[2] == 0,
           f"caches {tuple(k_cache.shape)} must be contiguous [blocks, bs, Hkv, {d}] with Hkv dividing H={q.shape[1]}")
    _check(tables.dtype == lens.dtype == torch.int32 and (tables.shape[1] <= 1 or tables.stride(1) == 1)
           and lens.is_contiguous(), "block tables and lengths must be int32, rows contiguous")
    return t


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None, out: torch.Tensor) -> None:
    """q, out: [B, H, D] contiguous; block_tables [B, nb] int32; context_lens [B] int32 (>= 1)."""
    t = _check_cache_inputs(q, k_cache, v_cache, block_tables, context_lens)
    b, heads, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    hpc = min(1 << (group - 1).bit_length(), HEADS_PER_CTA[-1])
    chunks = -(-group // hpc)
    max_context = block_tables.shape[1] * block_size
    splits = decode_splits(b * kv_heads * chunks, max_context, q.device)
    split_tokens = -(-max_context // splits)
    if splits > 1:
        ws_acc = torch.empty(b, heads, splits, d, dtype=torch.float32, device=q.device)
        ws_ml = torch.empty(b, heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        ws_acc = ws_ml = NULL
    name = f"decode_attention<{t}, {d}, {hpc}, {decode_stages(t, d, hpc, DECODE_STAGES)}>"
    launch("decode_attention.cu", name, q.device, (b, kv_heads * chunks, splits),
           (DECODE_THREADS,), (out, ws_acc, ws_ml, q, k_cache, v_cache, block_tables, i64(block_tables.stride(0)),
                               context_lens, heads, kv_heads, block_size, split_tokens, float(scale),
                               window or 0))
    if splits > 1:
        launch("decode_attention.cu", f"decode_attention_reduce<{t}>", q.device, (b * heads,), (d,),
               (out, ws_acc, ws_ml, splits, d))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
                      window: int | None, out: torch.Tensor) -> None:
    """q, out: [Tp, H, D] contiguous, the prefill rows; query_start [Bp + 1] int32 rows of q;
    seq_lens [Bp] int32; block_tables [Bp, nb] int32."""
    t = _check_cache_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    _check(query_start.dtype == torch.int32 and query_start.shape == (seq_lens.shape[0] + 1,),
           f"query_start must be int32 [{seq_lens.shape[0] + 1}]")
    bp, (_, heads, d) = seq_lens.shape[0], q.shape
    launch("prefill_attention.cu", f"prefill_attention<{t}, {d}>", q.device,
           (-(-max_query_len // PREFILL_QUERIES), heads, bp), (4 * PREFILL_QUERIES,),
           (out, q, k_cache, v_cache, query_start, seq_lens, block_tables, i64(block_tables.stride(0)), heads,
            k_cache.shape[2], k_cache.shape[1], float(scale), window or 0))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of the step's queries over the blocked cache, which already holds this
    step's K/V (`rotary_write_kv`). q: [T, H, D] -> [T, H, D]; decode rows first, then prefill."""
    nd = meta.num_decode_tokens
    out = torch.empty_like(q)
    if nd:
        decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, window,
                         out[:nd])
    if meta.num_prefill_seqs:
        prefill_attention(q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start,
                          meta.prefill_seq_lens, meta.prefill_max_query_len, scale, window, out[nd:])
    return out


def _lora_kernels_take(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, meta: LoRAMetadata) -> bool:
    """lora.cu's rules: slots given, at most 3 parts starting at even columns, r * P in shared
    memory, 16-byte rows of x; else the torch oracle runs (same result, more FLOPs)."""
    vec = 16 // x.element_size()
    return (meta.slots is not None and len(stack.parts) <= 3 and all(o % 2 == 0 for o in stack.offsets)
            and y.shape[1] % 2 == 0 and meta.rank * len(stack.parts) <= LORA_MAX_RANK_PARTS
            and x.shape[1] % vec == 0 and x.stride(1) == 1 and x.stride(0) % vec == 0 and x.data_ptr() % 16 == 0
            and y.stride(1) == 1 and y.stride(0) % 2 == 0 and y.data_ptr() % (2 * y.element_size()) == 0
            and x.dtype == y.dtype == stack.a.dtype)


def _expand_columns(y: torch.Tensor, stack: LoRAStack) -> int:
    """lora_expand's columns per thread: one 16-byte vector where the output width, the part
    starts and y's rows and base allow it, else 2 (even starts: `_lora_kernels_take`)."""
    vec = 16 // y.element_size()
    aligned = (y.shape[1] % vec == 0 and all(o % vec == 0 for o in stack.offsets) and y.stride(0) % vec == 0
               and y.data_ptr() % 16 == 0)
    return vec if aligned else 2


def add_lora(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, meta: LoRAMetadata) -> torch.Tensor:
    """lora.ops.add_lora with lora.cu's gather kernels: each token reads only its own slot's
    ranks [0, meta.rank) (the oracle multiplies every slot's). y [T, out] gets the deltas in place."""
    if not _lora_kernels_take(y, x, stack, meta):
        return torch_add_lora(y, x, stack, meta)
    t = _dtype(y, x, stack.a, stack.b)
    slots = meta.slots
    n, r, parts = slots.shape[0], meta.rank, len(stack.parts)
    _check(slots.dtype == torch.int64 and slots.is_contiguous(), "LoRA slots must be contiguous int64")
    rows = meta.rows if meta.rows is not None else NULL
    _check(meta.rows is None or (meta.rows.dtype == torch.int64 and meta.rows.shape == (n,)),
           f"LoRA rows must be int64 [{n}]")
    _check(0 < r <= stack.a.shape[0] and x.shape[1] == stack.a.shape[-1] and y.shape[1] == stack.b.shape[-1],
           f"LoRA: rank {r} must be in [1, {stack.a.shape[0]}], x [T, {stack.a.shape[-1]}] and y [T, "
           f"{stack.b.shape[-1]}] (got {tuple(x.shape)}, {tuple(y.shape)})")
    if n == 0:
        return y
    h = torch.empty(n, r * parts, dtype=torch.float32, device=y.device)  # every token's down-projection
    num_slots, in_features, out = stack.a.shape[1], x.shape[1], y.shape[1]
    launch("lora.cu", f"lora_shrink<{t}>", y.device, (n, -(-r * parts // LORA_SHRINK_ROWS)),
           (LORA_SHRINK_THREADS,), (h, x, stack.a, slots, rows, r, num_slots, parts, in_features, i64(x.stride(0))))
    starts = [*stack.offsets[1:], out, out][:2]  # parts 1 and 2 begin here (`out`: no such part)
    cols = _expand_columns(y, stack)
    launch("lora.cu", f"lora_expand<{t}, {cols}>", y.device, (n, -(-out // (cols * LORA_EXPAND_THREADS))),
           (LORA_EXPAND_THREADS,), (y, h, stack.b, slots, rows, r, num_slots, parts, out, *starts, i64(y.stride(0))))
    return y


def dense_gemv_supported(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """gemv.cu's rules for x2 [M, K] @ weight [N, K]^T: 16-bit, at most DENSE_GEMV_MAX_ROWS rows,
    K % 8 == 0, weight contiguous and x2's rows 16-byte aligned (one 16-byte load per lane)."""
    return (x2.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x2.dtype and x2.is_cuda
            and weight.device == x2.device and 0 < x2.shape[0] <= DENSE_GEMV_MAX_ROWS and weight.dim() == 2
            and weight.shape[0] > 0 and weight.is_contiguous() and x2.shape[1] == weight.shape[1]
            and x2.shape[1] % 8 == 0 and x2.stride(1) == 1 and x2.stride(0) % 8 == 0
            and x2.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and (bias is None or (bias.dtype == x2.dtype and bias.device == x2.device
                                  and bias.shape == weight.shape[:1] and bias.is_contiguous())))


def dense_gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for decode rows: x2 [M <= 4, K] -> [M, N] by gemv.cu (fp32 accumulate, the bias
    added before the one rounding)."""
    t = _dtype(x2, weight)
    _check(dense_gemv_supported(x2, weight, bias), f"dense_gemv needs 16-bit x [<= {DENSE_GEMV_MAX_ROWS}, K % 8] "
           f"with aligned rows and a contiguous weight, got x {tuple(x2.shape)} {x2.dtype} stride {x2.stride()}, "
           f"weight {tuple(weight.shape)}")
    m, k = x2.shape
    n = weight.shape[0]
    rows = next(r for r in DENSE_GEMV_ROWS if r >= m)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    launch("gemv.cu", f"dense_gemv<{t}, {rows}, {DENSE_GEMV_RPW}>", x2.device,
           (-(-n // (DENSE_GEMV_WARPS * DENSE_GEMV_RPW)),), (DENSE_GEMV_WARPS * 32,),
           (y, x2, weight, NULL if bias is None else bias, m, k, n, i64(x2.stride(0))))
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           lora: LoRAStack | None = None, lora_meta: LoRAMetadata | None = None) -> torch.Tensor:
    """torch_engine.ops.linear: gemv.cu for up to DENSE_GEMV_MAX_ROWS 16-bit rows (decode) of
    at most DENSE_GEMV_MAX_IN inputs, else cuBLAS through torch; then the deltas by lora.cu's
    kernels. float32 stays on cuBLAS: its greedy tokens are compared with transformers' for identity."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] <= DENSE_GEMV_MAX_IN and dense_gemv_supported(x2, weight, bias):
        y = dense_gemv(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight, bias)
    return torch_ops.add_bias_and_lora(y, x, None, lora, lora_meta, add_lora)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) for float32 [R, V] rows with contiguous vocabularies -> [R] int64:
    sample.cu's argmax_part over (rows, parts) CTAs (enough parts for about two waves of the SMs,
    at most ARGMAX_MAX_PARTS, each at least ARGMAX_MIN_CHUNK logits), then argmax_final."""
    _check(logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 and logits.is_cuda,
           f"logits must be CUDA float32 [R, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0 or vocab == 0:
        return tokens.zero_()
    parts = max(1, min(ARGMAX_MAX_PARTS, -(-2 * _num_sms(device_index(logits.device)) // rows),
                       -(-vocab // ARGMAX_MIN_CHUNK)))
    chunk = -(-vocab // parts)
    part_val = torch.empty(rows, parts, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, parts, dtype=torch.int32, device=logits.device)
    launch("sample.cu", "argmax_part", logits.device, (rows, parts), (ARGMAX_THREADS,),
           (part_val, part_idx, logits, vocab, i64(logits.stride(0)), chunk))
    launch("sample.cu", "argmax_final", logits.device, (rows,), (32,), (tokens, part_val, part_idx, parts, vocab))
    return tokens


def sample_race(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """lmq.sampling's exponential race over counter_exponentials' draws in one kernel: logits
    [R, V] float32 (temperature-scaled, filtered), keys [R] int64 -> tokens [R] int64."""
    _check(logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 and logits.is_cuda,
           f"logits must be CUDA float32 [R, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    _check(keys.dtype == torch.int64 and keys.shape == logits.shape[:1] and keys.is_contiguous()
           and keys.device == logits.device, f"keys must be contiguous int64 [{logits.shape[0]}] on {logits.device}")
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        launch("sample.cu", "sample_race", logits.device, (logits.shape[0],), (SAMPLE_THREADS,),
               (tokens, logits, keys, logits.shape[1], i64(logits.stride(0))))
    return tokens


def _awq_per_thread(in_features: int, group_size: int, col_ctas: int, device: torch.device) -> int:
    """Inputs each awq_gemv thread sums: a divisor of the group (one scale) with KS of them
    tiling the input dim, at most 32 (awq_gemv.cu's xs), and fewer (down to 8: more splits, more CTAs) while the
    output columns' `col_ctas` CTAs times the splits would not cover the SMs."""
    fits = [pt for pt in (32, 16, 8, 4, 2, 1) if group_size % pt == 0 and in_features % (AWQ_KS * pt) == 0]
    _check(bool(fits), f"in_features={in_features} is not a multiple of {AWQ_KS}")
    sms = _num_sms(device_index(device))
    for pt in fits:
        if pt <= 8 or col_ctas * (in_features // (AWQ_KS * pt)) >= sms:
            return pt
    return fits[-1]


def _awq_vec(packed_cols: int, rows: int, qweight: torch.Tensor, vec: int | None) -> int:
    """awq_gemv's packed columns per thread: `vec` (default AWQ_GEMV_VEC), halved until it
    divides the packed columns and the rows' loads are aligned to it (4 only with MR <= 4:
    its shared memory)."""
    v = vec or AWQ_GEMV_VEC
    _check(v in (1, 2, 4), f"awq_gemv vec must be 1, 2 or 4, got {v}")
    if rows > 4:
        v = min(v, 2)
    while v > 1 and (packed_cols % v or qweight.data_ptr() % (4 * v)):
        v //= 2
    return v


def _check_awq(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> str:
    """AutoAWQ's GEMM layout for x [M, in]: qweight [in, out / 8], qzeros [in / g, out / 8] int32,
    scales [in / g, out] half, all contiguous -> x's C type."""
    in_features, out_features = x.shape[1], scales.shape[1]
    t = _dtype(x)
    _check(qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
           and qweight.shape == (in_features, out_features // 8) and out_features % 8 == 0
           and qzeros.shape == (in_features // group_size, out_features // 8)
           and scales.shape[0] == in_features // group_size and in_features % group_size == 0
           and all(p.is_contiguous() for p in (qweight, qzeros, scales)),
           f"AWQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} "
           f"do not match in={in_features}, group_size={group_size} in AutoAWQ's GEMM layout")
    return t


def _sum_splits(y: torch.Tensor, ws: torch.Tensor, splits: int, t: str) -> None:
    """y [M, out] (C type t) = the sum over ws [splits, M, out] float32, in split order (the
    W4A16 kernels' deterministic split-K reduce)."""
    n = y.numel()
    launch("awq_gemv.cu", f"awq_gemv_reduce<{t}>", y.device, (-(-n // 256),), (256,), (y, ws, splits, i64(n)))


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int, vec: int | None = None) -> torch.Tensor:
    """x: [M <= 8, in] -> [M, out]: the W4A16 kernel over AutoAWQ's packed tensors. `vec`:
    packed columns per thread (bench/awq_gemm.py compares them; default AWQ_GEMV_VEC)."""
    m, in_features = x.shape
    out_features = scales.shape[1]
    t = _check_awq(x, qweight, qzeros, scales, group_size)
    _check(m <= AWQ_GEMV_MAX_ROWS, f"awq_gemv takes at most {AWQ_GEMV_MAX_ROWS} rows, got {m}")
    x = x.contiguous()
    rows = next(r for r in AWQ_GEMV_ROWS if r >= m)
    v = _awq_vec(out_features // 8, rows, qweight, vec)
    col_ctas = -(-out_features // 8 // (AWQ_COLS * v))
    pt = _awq_per_thread(in_features, group_size, col_ctas, x.device)
    splits = in_features // (AWQ_KS * pt)
    ws = torch.empty(splits, m, out_features, dtype=torch.float32, device=x.device)
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    launch("awq_gemv.cu", f"awq_gemv<{t}, {rows}, {v}>", x.device, (col_ctas, splits), (AWQ_COLS, AWQ_KS),
           (ws, x, qweight, qzeros, scales, m, in_features, out_features, group_size, AWQ_KS * pt))
    _sum_splits(y, ws, splits, t)
    return y


def awq_gemm_supported(x: torch.Tensor, out_features: int, group_size: int) -> bool:
    """awq_gemm.cu's shape rules: 16-bit x, N % BN == 0, K and the group multiples of BK."""
    _, bn, bk = AWQ_GEMM_TILE
    return (x.dtype in (torch.float16, torch.bfloat16) and out_features % bn == 0 and x.shape[1] % bk == 0
            and group_size % bk == 0)


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> torch.Tensor:
    """x: [M, in] fp16 / bf16 -> [M, out]: the tensor-core W4A16 kernel over AutoAWQ's packed
    tensors (prefill, batches past awq_gemv's rows); split over the inputs when the output tiles
    alone would leave SMs idle."""
    m, in_features = x.shape
    out_features = scales.shape[1]
    t = _check_awq(x, qweight, qzeros, scales, group_size)
    _check(awq_gemm_supported(x, out_features, group_size), f"awq_gemm needs fp16/bf16 x, out % "
           f"{AWQ_GEMM_TILE[1]} == 0, in and group_size % {AWQ_GEMM_TILE[2]} == 0: got {x.dtype}, out={out_features}, "
           f"in={in_features}, group_size={group_size}")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()  # a fresh allocation: 16-byte aligned, as cp.async needs
    _check(all(p.data_ptr() % 16 == 0 for p in (qweight, qzeros, scales)), "AWQ tensors must be 16-byte aligned")
    bm, bn, bk = AWQ_GEMM_TILE
    ctas = (out_features // bn) * -(-m // bm)
    tiles = in_features // bk
    splits = split_k(ctas, tiles // AWQ_GEMM_MIN_TILES, x.device)
    k_split = -(-tiles // splits) * bk
    splits = -(-in_features // k_split)  # no empty split
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    ws = torch.empty(splits, m, out_features, dtype=torch.float32, device=x.device) if splits > 1 else NULL
    launch("awq_gemm.cu", f"awq_gemm<{t}>", x.device, (out_features // bn, -(-m // bm), splits), (256,),
           (y, ws, x, qweight, qzeros, scales, m, in_features, out_features, group_size, k_split))
    if splits > 1:
        _sum_splits(y, ws, splits, t)
    return y


def awq_mma_tile(m: int, group_size: int) -> tuple[int, int, int]:
    """awq_mma's (MF, BK, STAGES) for m rows: the fewest m16 tiles that hold them (at most 4,
    more rows take more CTAs), 64 inputs a stage where the group allows it and 4 tiles do not
    leave only 2 stages of shared memory, else 32."""
    mf = next((f for f in AWQ_MMA_ROW_TILES if 16 * f >= m), AWQ_MMA_ROW_TILES[-1])
    bk = max(b for b in AWQ_MMA_BKS if group_size % b == 0 and (b == AWQ_MMA_BKS[0] or awq_mma_stages(mf, b) >= 3))
    return mf, bk, awq_mma_stages(mf, bk)


def _check_awq_mma(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> str:
    """turbomind's AWQ layout (awq_layout.py) for x [M, in] fp16 / bf16 -> x's C type."""
    in_features, out_features = x.shape[1], scales.shape[1]
    t = _dtype(x, scales)
    _check(t != "float", f"awq_mma needs fp16 or bf16 x, got {x.dtype}")
    _check(awq_layout.supported(in_features, out_features, group_size),
           f"awq_mma needs out % {awq_layout.GROUP_COLS} == 0 and group_size % {awq_layout.MMA_GROUP_MULTIPLE} == 0 "
           f"dividing in: got in={in_features}, out={out_features}, group_size={group_size}")
    _check(qweight.dtype == qzeros.dtype == torch.int32 and qweight.shape == (in_features // 16, 2 * out_features)
           and qzeros.shape == (in_features // group_size, out_features // 8)
           and scales.shape == (in_features // group_size, out_features)
           and all(p.is_contiguous() and p.data_ptr() % 16 == 0 and p.device == x.device
                   for p in (qweight, qzeros, scales)),
           f"AWQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} "
           f"do not match in={in_features}, group_size={group_size} in turbomind's layout (awq_pack), contiguous, "
           f"16-byte aligned, on {x.device}")
    return t


def awq_mma(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            group_size: int, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x: [M, in] fp16 / bf16 -> [M, out]: the tensor-core W4A16 kernel over awq_pack's layout,
    split over the inputs when the output tiles alone would leave SMs idle. `tile`: (MF, BK,
    STAGES) of an awq_mma instantiation (bench/awq_gemm.py compares them; default awq_mma_tile)."""
    m, in_features = x.shape
    out_features = scales.shape[1]
    t = _check_awq_mma(x, qweight, qzeros, scales, group_size)
    mf, bk, stages = tile or awq_mma_tile(m, group_size)
    _check(mf in AWQ_MMA_ROW_TILES and bk in AWQ_MMA_BKS and group_size % bk == 0 and stages == awq_mma_stages(mf, bk),
           f"awq_mma has no tile {(mf, bk, stages)} for group_size={group_size}: (MF, BK, STAGES) with MF in "
           f"{AWQ_MMA_ROW_TILES}, BK in {AWQ_MMA_BKS} dividing the group, STAGES = awq_mma_stages(MF, BK)")
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()  # a fresh allocation: 16-byte aligned, as cp.async needs
    bm = 16 * mf
    col_ctas, row_ctas = -(-out_features // AWQ_MMA_BN), -(-m // bm)
    total = in_features // bk
    splits = split_k(col_ctas * row_ctas, total // AWQ_MMA_MIN_STAGES, x.device)
    k_split = -(-total // splits) * bk
    splits = -(-in_features // k_split)  # no empty split
    ws = torch.empty(splits, m, out_features, dtype=torch.float32, device=x.device) if splits > 1 else NULL
    launch("awq_mma.cu", f"awq_mma<{t}, {mf}, {bk}, {stages}>", x.device, (col_ctas, row_ctas, splits), (128,),
           (y, ws, x, qweight, qzeros, scales, m, in_features, out_features, group_size, k_split))
    if splits > 1:
        _sum_splits(y, ws, splits, t)
    return y


def awq_pack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An AWQ linear's AutoAWQ tensors (as loaded; scales in the model dtype) -> the layout
    awq_linear reads: turbomind's repacked one for awq_mma (awq_layout.py) with AWQ_MMA on and
    a shape and dtype awq_mma takes, else AutoAWQ's own with float16 scales, as awq_gemv and
    awq_gemm read them (exact: the checkpoint's scales are float16, and a bfloat16 or float32
    model's copies of them convert back without rounding). Once per linear, at load time."""
    in_features, out_features = qweight.shape[0], scales.shape[1]
    if AWQ_MMA and scales.dtype in (torch.float16, torch.bfloat16) and awq_layout.supported(
            in_features, out_features, group_size):
        return awq_layout.repack(qweight, qzeros, scales, scales.dtype)
    return qweight, qzeros, scales.to(torch.float16)


def _autoawq_layout(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Which of awq_pack's layouts an AWQ linear is in: AutoAWQ's qweight has a row per input,
    turbomind's one per 16 inputs."""
    return qweight.shape[0] == x.shape[-1]


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, lora: LoRAStack | None = None,
               lora_meta: LoRAMetadata | None = None) -> torch.Tensor:
    """torch_engine.ops.awq_linear over either of awq_pack's layouts. Repacked: awq_mma up to
    AWQ_MMA_MAX_ROWS, else the weight dequantized and cuBLAS. AutoAWQ's: awq_gemv for up to 8
    rows (decode), awq_gemm up to AWQ_GEMM_MAX_ROWS (large decode batches, short prefills), else
    the weight dequantized and cuBLAS (long prefills are compute-bound, where cuBLAS' GEMM beats
    mma.sync tiles)."""
    m = x.shape[0]
    if not _autoawq_layout(x, qweight):
        if m <= AWQ_MMA_MAX_ROWS:
            y = awq_mma(x, qweight, qzeros, scales, group_size)
        else:
            y = x @ awq_layout.dequantize(qweight, qzeros, scales, group_size, x.dtype)
    elif 0 < m <= AWQ_GEMV_MAX_ROWS:
        y = awq_gemv(x, qweight, qzeros, scales, group_size)
    elif AWQ_GEMV_MAX_ROWS < m <= AWQ_GEMM_MAX_ROWS and awq_gemm_supported(x, scales.shape[1], group_size):
        y = awq_gemm(x, qweight, qzeros, scales, group_size)
    else:
        y = torch_ops.awq_linear(x, qweight, qzeros, scales, group_size)
    return torch_ops.add_bias_and_lora(y, x, bias, lora, lora_meta, add_lora)
