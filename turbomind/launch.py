"""Loading compiled kernels and launching them on torch's current stream.

Every instantiation a launcher may use is listed in INSTANTIATIONS: one NVRTC compile per file
(turbomind.compiler caches it in memory and on disk), one loaded module per file and device.
Kernels take raw pointers and numpy scalars: no CuPy arrays are made, and the launch goes to
torch's current stream, so a CUDA graph that torch captures records it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from turbomind.compiler import compile_kernel_file

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
HEAD_DIMS = (64, 128)
HEADS_PER_CTA = (1, 2, 4, 8)  # decode attention: query heads of one KV head handled per CTA
DECODE_STAGES = 3  # decode_attention.cu's cp.async pipeline depth for 16-bit caches (BENCHMARKS.md)
DECODE_STAGE_SWEEP = (1, 2, 3, 4)
NULL = np.uint64(0)  # a null pointer argument
i64 = np.int64  # a `long long` argument (plain ints are passed as int32)


def decode_stages(ctype: str, head_dim: int, heads_per_cta: int, stages: int = DECODE_STAGES) -> int:
    """decode_attention's pipeline depth for a cache type and shape: at most `stages`, as many as
    fit the 48 KB of static shared memory beside the final merge's [4 warps, HPC, D] floats.
    A stage holds 2 tokens' K and V rows for each of the 128 threads (8 elements a thread)."""
    size = 4 if ctype == "float" else 2
    stage_bytes = 2 * 2 * 128 * 8 * size
    merge_bytes = 4 * heads_per_cta * (head_dim + 2) * 4
    return max(1, min(stages, (48 * 1024 - merge_bytes) // stage_bytes))


AWQ_MMA_ROW_TILES = (1, 2, 4)  # awq_mma.cu's MF: m16 tiles of rows per CTA
AWQ_MMA_BKS = (32, 64)  # its inputs per pipeline stage (64 needs a group size that is a multiple)


def awq_mma_stages(mf: int, bk: int) -> int:
    """awq_mma's pipeline depth: at most 4, as many stages as fit 48 KB of static shared memory
    (awq_mma.cu's Stage: x [16 MF, BK + 8] 16-bit, BK / 16 x 128 threads x 16 B of weights,
    128 B of zero words and 512 B of scales)."""
    stage_bytes = 16 * mf * (bk + 8) * 2 + bk // 16 * 128 * 16 + 128 + 512
    return min(4, 48 * 1024 // stage_bytes)


INSTANTIATIONS: dict[str, tuple[str, ...]] = {
    "norm.cu": tuple(f"rms_norm<{t}>" for t in CTYPES.values())
    + tuple(f"rms_norm_vec<{t}, {v}>" for t in CTYPES.values() for v in (1, 2, 4)),
    "activation.cu": tuple(f"silu_and_mul<{t}>" for t in CTYPES.values()),
    "rotary_kv.cu": tuple(f"rotary_write_kv<{t}>" for t in CTYPES.values()),
    "decode_attention.cu": tuple(f"decode_attention<{t}, {d}, {h}, {decode_stages(t, d, h)}>" for t in CTYPES.values()
                                 for d in HEAD_DIMS for h in HEADS_PER_CTA)
    # bench/turbomind_decode.py's pipeline-depth sweep, on its shape (bf16, head_dim 128, 4 heads a CTA)
    + tuple(f"decode_attention<__nv_bfloat16, 128, 4, {s}>" for s in DECODE_STAGE_SWEEP if s != DECODE_STAGES)
    + tuple(f"decode_attention_reduce<{t}>" for t in CTYPES.values()),
    "awq_gemv.cu": tuple(f"awq_gemv<{t}, {r}, {v}>" for t in CTYPES.values() for r in (1, 2, 4, 8) for v in (1, 2, 4)
                         if r * v <= 16)
    + tuple(f"awq_gemv_reduce<{t}>" for t in CTYPES.values()),
    "awq_gemm.cu": ("awq_gemm<__half>", "awq_gemm<__nv_bfloat16>"),  # tensor cores: 16-bit only
    "awq_mma.cu": tuple(f"awq_mma<{t}, {mf}, {bk}, {awq_mma_stages(mf, bk)}>" for t in ("__half", "__nv_bfloat16")
                        for mf in AWQ_MMA_ROW_TILES for bk in AWQ_MMA_BKS),
    "lora.cu": tuple(f"lora_shrink<{t}>" for t in CTYPES.values())
    + tuple(f"lora_expand<{t}, {n}>" for t in CTYPES.values() for n in sorted({2, 16 // (4 if t == "float" else 2)})),
    "sample.cu": ("sample_race", "argmax_part", "argmax_final"),
    "gemv.cu": tuple(f"dense_gemv<{t}, {r}, 2>" for t in ("__half", "__nv_bfloat16") for r in (1, 2, 4)),
    "prefill_attention.cu": tuple(f"prefill_attention<{t}, {d}>" for t in CTYPES.values() for d in HEAD_DIMS),
}


@functools.cache
def _module(file: str, device_index: int) -> tuple[object, dict[str, str]]:
    import cupy

    cubin, lowered = compile_kernel_file(file, INSTANTIATIONS[file])
    with cupy.cuda.Device(device_index):
        module = cupy.cuda.function.Module()
        module.load(cubin)
    return module, lowered


@functools.cache
def kernel(file: str, name: str, device_index: int) -> object:
    """The loaded kernel `name` (an entry of INSTANTIATIONS[file]) on a device."""
    module, lowered = _module(file, device_index)
    return module.get_function(lowered[name])


@functools.cache
def _stream(ptr: int, device_index: int) -> object:
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.cuda.ExternalStream(ptr, device_index)  # the device named (CuPy: -1 is unknown)


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def launch(file: str, name: str, device: torch.device, grid: tuple[int, ...], block: tuple[int, ...],
           args: tuple) -> None:
    """Launch on torch's current stream of `device`; args: tensors (passed as pointers),
    ints (int32), floats (float32), or numpy scalars of the exact type (i64, NULL)."""
    index = device_index(device)
    stream = _stream(torch.cuda.current_stream(device).cuda_stream, index)
    kernel(file, name, index)(grid, block, tuple(_arg(a) for a in args), stream=stream)


def _arg(a: object) -> object:
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if isinstance(a, bool):
        raise TypeError("pass flags as int")
    if isinstance(a, int):
        return np.int32(a)
    if isinstance(a, float):
        return np.float32(a)
    return a
