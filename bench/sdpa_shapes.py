"""What a first-seen shape costs `scaled_dot_product_attention`, per backend (GPU only).

    python bench/sdpa_shapes.py

A prefill attention call (bool mask, grouped KV heads) on shapes seen for the first time, as a
server's steps produce them while requests come and go, then the same shapes again: with every
backend allowed (PyTorch's choice) and with cuDNN left out, GQA through `enable_gqa`; then
torch_engine's call (ops.CUDA_SDPA_BACKENDS, K/V repeated per query head) with only the
memory-efficient kernel allowed. A backend that builds a plan per shape pays it on the host
inside the step (BENCHMARKS.md, "Server under load", run E).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def call(max_q: int, num_blocks: int, heads: int, kv_heads: int, head_dim: int, gqa: bool = True,
         block_size: int = 16) -> float:
    """One prefill-shaped call on fresh random inputs; milliseconds, host and device."""
    keys = num_blocks * block_size
    q = torch.randn(1, heads, max_q, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, keys, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qpos = torch.arange(max_q, device="cuda")[None, :, None] + (keys - max_q)  # the chunk ends the context
    mask = (torch.arange(keys, device="cuda")[None, None, :] <= qpos)[:, None]  # [1, 1, max_q, keys]
    torch.cuda.synchronize()
    t = time.perf_counter()
    if not gqa:  # torch_engine's CUDA path: the efficient kernel has no enable_gqa with a mask
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim ** -0.5, enable_gqa=gqa)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, default=12, help="first-seen shapes per backend set")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    dims = (args.heads, args.kv_heads, args.head_dim)
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    start = 40
    variants = (("all backends", contextlib.nullcontext, True),
                ("without cuDNN", lambda: sdpa_kernel(no_cudnn), True),
                ("efficient only, K/V repeated", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), False))
    for name, ctx, gqa in variants:
        with ctx():
            call(8, 1, *dims, gqa)  # module load, handles
            shapes = [(start + i, (start + i) // 16 + 1) for i in range(args.shapes)]
            first = [call(q, nb, *dims, gqa) for q, nb in shapes]
            again = [call(q, nb, *dims, gqa) for q, nb in shapes]
        start += args.shapes + 8  # the next set sees shapes new to it too
        print(f"{name:>28}: first-seen shape median {statistics.median(first):7.2f} ms (max {max(first):.2f}), "
              f"seen before {statistics.median(again):.2f} ms")

if __name__ == "__main__":
    main()
