"""The ops interface in plain torch: what every model file calls, and the oracle that the
turbomind kernels are tested against. The arithmetic follows transformers' Llama code
(float32 RMSNorm statistics, rotate-half rotary) so float32 results match it closely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora.ops import LoRAMetadata, LoRAStack, add_lora
from quant_tools.awq_format import dequantize
from torch_engine.attention_metadata import AttentionMetadata

# The backends `attention` may take on CUDA, entered once per step by the runner (`sdpa_kernel`
# costs ~13 us a call: too much per layer). cuDNN is left out: it builds a plan for every shape
# it has not seen, 40-50 ms each on an H200, and eager steps see new shapes all the time
# (BENCHMARKS.md, "Server under load"). Flash takes no mask, so the memory-efficient kernel runs
# both calls below; MATH stays last so that a shape it refuses is slow rather than an error
# (tests/test_gpu_attention.py checks that no shape the engine makes needs it).
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """Around every forward pass and graph capture: the SDPA backends `attention` may take."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def embedding(token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """token_ids: [T] -> [T, hidden]"""
    return F.embedding(token_ids, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           lora: LoRAStack | None = None, lora_meta: LoRAMetadata | None = None) -> torch.Tensor:
    """x: [T, in], weight: [out, in] -> [T, out], plus each token's adapter delta when the step
    has adapter tokens (`lora_meta.rank > 0`)."""
    return add_bias_and_lora(F.linear(x, weight, bias), x, None, lora, lora_meta)


def awq_pack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An AWQ linear's tensors as loaded -> the layout awq_linear reads: here AutoAWQ's own."""
    return qweight, qzeros, scales


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, lora: LoRAStack | None = None,
               lora_meta: LoRAMetadata | None = None) -> torch.Tensor:
    """x: [T, in]; AutoAWQ's packed qweight [in, out / 8], qzeros [in / g, out / 8], scales
    [in / g, out] -> [T, out]: the weight dequantized for this call, then `linear`'s matmul."""
    y = x @ dequantize(qweight, qzeros, scales, group_size, x.dtype)  # [T, out]
    return add_bias_and_lora(y, x, bias, lora, lora_meta)


def add_bias_and_lora(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, lora: LoRAStack | None,
                      lora_meta: LoRAMetadata | None, delta: Callable = add_lora) -> torch.Tensor:
    """y [T, out] = x @ W^T from any GEMM, plus the bias and each token's adapter delta (when the
    step has adapter tokens: `lora_meta.rank > 0`) by `delta` (lora.ops.add_lora's signature:
    turbomind passes its kernels)."""
    if bias is not None:
        y = y + bias
    if lora is not None and lora_meta is not None and lora_meta.rank:
        y = delta(y, x, lora, lora_meta)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual). With `residual`, x + residual is normed and becomes the
    new residual (the pre-norm decoder's add-then-norm); without, x itself is the residual."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] (gate | up) -> [T, I]"""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
           cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D], cos_sin: [max_len, 2, D] in the model dtype."""
    cs = cos_sin[positions]  # [T, 2, D]
    cos, sin = cs[:, 0, None, :], cs[:, 1, None, :]  # [T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]."""
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary on q and k, then k and v written to the cache at slot_mapping (one op: a kernel
    does both in one pass). q: [T, H, D], k, v: [T, Hkv, D] -> rotated q [T, H, D]."""
    q, k = rotary(positions, q, k, cos_sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, Hkv, D] by [B, nb] -> [B, Hkv, nb * bs, D]"""
    b, nb = block_tables.shape
    # index_select copies whole blocks with a row-gather kernel; advanced indexing with a
    # strided index (a CUDA graph's slice of its static table) falls back to a much slower one.
    g = cache.index_select(0, block_tables.reshape(-1))  # [B * nb, bs, Hkv, D]
    return g.view(b, nb * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of the step's queries over the blocked cache, which already holds this
    step's K/V (`rotary_write_kv`). q: [T, H, D] -> [T, H, D]"""
    block_size, nd = k_cache.shape[1], meta.num_decode_tokens
    out = torch.empty_like(q)
    if nd:
        # GQA without repeating K/V: the G query heads sharing a KV head become G "query rows"
        # of that head, all at the same position, so one [Bd, 1, 1, L] mask serves them all.
        bd, h, d = q[:nd].shape
        hkv = k_cache.shape[2]
        qg = q[:nd].view(bd, hkv, h // hkv, d)  # [Bd, Hkv, G, D]
        o = F.scaled_dot_product_attention(
            qg, _gather(k_cache, meta.decode_block_tables), _gather(v_cache, meta.decode_block_tables),
            attn_mask=meta.decode_mask(block_size, window), scale=scale)
        out[:nd] = o.reshape(bd, h, d)
    if meta.num_prefill_seqs:
        qp = q[nd:][meta.prefill_pad_index].transpose(1, 2)  # [Bp, H, max_q, D]
        kp = _gather(k_cache, meta.prefill_block_tables)  # [Bp, Hkv, L, D]
        vp = _gather(v_cache, meta.prefill_block_tables)
        # CUDA's memory-efficient kernel has no enable_gqa with a mask (PyTorch would fall back to
        # MATH): K/V are repeated per query head there; the CPU's flash kernel groups natively.
        gqa = not q.is_cuda
        if not gqa and kp.shape[1] != qp.shape[1]:
            g = qp.shape[1] // kp.shape[1]
            kp, vp = kp.repeat_interleave(g, dim=1), vp.repeat_interleave(g, dim=1)  # [Bp, H, L, D]
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.prefill_mask(block_size, window),
                                           scale=scale, enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(-1, *q.shape[1:])  # [Bp * max_q, H, D]
        out[nd:] = o[meta.prefill_unpad_index]
    return out
