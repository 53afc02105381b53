"""turbomind's W4A16 kernels against the bf16 GEMM they replace, on the GPU: the four linears of a
Llama-3-8B decoder layer (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096),
random AutoAWQ weights (group 128), over row counts from decode batches to a prefill.

For each row count M it times, with CUDA events, one pass over the layer's four linears:
- bf16: `torch_engine.ops.linear` (cuBLAS) on [out, in] bf16 weights; dense_gemv: turbomind's
  gemv.cu on the same weights (up to 4 rows, as turbomind's linear takes it);
- awq: `turbomind.ops.awq_linear` on AutoAWQ's layout (awq_gemv up to 8 rows, awq_gemm up to
  AWQ_GEMM_MAX_ROWS, else dequantize + cuBLAS), and its kernels alone: awq_gemv (1 packed
  column a thread), awq_gemm, dequant (dequantize + cuBLAS);
- awq_repacked: `turbomind.ops.awq_linear` on turbomind's repacked layout (awq_layout.py:
  awq_mma up to AWQ_MMA_MAX_ROWS, else dequantize + cuBLAS), and awq_mma_<MF>x<BK>: each
  awq_mma tile alone (16 MF rows a CTA, BK inputs a stage);
and reports each as a ratio of bf16's time (the issue's goal: within 1.3x of bf16 at M = 128).
Every variant cycles through enough weight copies to overflow the L2 cache, so no variant is
timed on weights that stay on chip. The passes are captured in one CUDA graph and replayed, as
the engine's decode steps are: eager, each launch costs tens of microseconds of Python and CuPy
on the host, which at one row is longer than the W4A16 kernels themselves (`--eager`).

    python bench/awq_gemm.py --json bench/results/awq_gemm_h200.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import _paths  # noqa: F401  (first: see its docstring)
import torch
from tqdm.auto import tqdm

from quant_tools.awq_format import pack
from torch_engine import ops as torch_ops
from turbomind import ops as tm
from turbomind.launch import AWQ_MMA_BKS, AWQ_MMA_ROW_TILES, awq_mma_stages

LAYER = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (in, out)
GROUP = 128
AWQ_BYTES = sum(i * o // 2 + (i // GROUP) * o * 5 // 2 for i, o in LAYER.values())  # packed weights, scales, zeros
L2_OVERFLOW_BYTES = 512 << 20  # each variant's weight copies together exceed any L2 by far


def _copies(bytes_per_copy: int) -> int:
    return max(2, -(-L2_OVERFLOW_BYTES // bytes_per_copy))


def make_weights(dtype: torch.dtype) -> tuple[list[dict], list[dict], list[dict]]:
    """(dense copies, AutoAWQ copies, turbomind-layout copies): each copy {name: weight} over LAYER."""
    dense_bytes = sum(i * o * 2 for i, o in LAYER.values())
    g = torch.Generator("cuda").manual_seed(0)
    base = {}
    for name, (i, o) in LAYER.items():
        q = torch.randint(0, 16, (i, o), device="cuda", generator=g)
        z = torch.randint(0, 16, (i // GROUP, o), device="cuda", generator=g)
        s = (0.01 + 0.02 * torch.rand(i // GROUP, o, device="cuda", generator=g)).half()
        base[name] = (pack(q), pack(z), s)
    packed = {n: tm.awq_pack(qw, qz, s.to(dtype), GROUP) for n, (qw, qz, s) in base.items()}
    awq = [{n: tuple(t.clone() for t in w) for n, w in base.items()} for _ in range(_copies(AWQ_BYTES))]
    mma = [{n: tuple(t.clone() for t in w) for n, w in packed.items()} for _ in range(_copies(AWQ_BYTES))]
    dense = [{n: (0.02 * torch.randn(o, i, device="cuda", generator=g)).to(dtype) for n, (i, o) in LAYER.items()}
             for _ in range(_copies(dense_bytes))]
    return dense, awq, mma


def _mma(x: torch.Tensor, w: tuple, tile: tuple[int, int, int]) -> torch.Tensor:
    return tm.awq_mma(x, *w, GROUP, tile=tile)


def time_variant(fn, copies: list[dict], xs: dict[int, torch.Tensor], iters: int, eager: bool = False,
                 names: tuple[str, ...] = tuple(LAYER)) -> float:
    """Mean seconds of one pass over the layer's linears (or those `names`), cycling through the
    weight copies: `iters` passes captured in one CUDA graph and replayed (eager: launched from
    Python)."""
    def one_pass(step: int) -> None:
        w = copies[step % len(copies)]
        for name in names:
            fn(xs[LAYER[name][0]], w[name])

    def passes() -> None:
        for s in range(iters):
            one_pass(s)

    side = torch.cuda.Stream()  # warm-up off the capture stream: compile, autotune, touch every copy
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in range(len(copies)):
            one_pass(s)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run = passes
    if not eager:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            passes()
        graph.replay()  # the first replay uploads the graph
        run = graph.replay
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--eager", action="store_true", help="launch from Python instead of replaying a CUDA graph")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    dense, awq, mma = make_weights(dtype)
    tiles = {f"awq_mma_{mf}x{bk}": (mf, bk, awq_mma_stages(mf, bk)) for mf in AWQ_MMA_ROW_TILES for bk in AWQ_MMA_BKS
             if GROUP % bk == 0}
    variants = {
        "bf16": (lambda x, w: torch_ops.linear(x, w), dense),
        "dense_gemv": (lambda x, w: tm.dense_gemv(x, w), dense),  # gemv.cu on the bf16 weights (<= 4 rows)
        "awq": (lambda x, w: tm.awq_linear(x, *w, GROUP), awq),
        "awq_repacked": (lambda x, w: tm.awq_linear(x, *w, GROUP), mma),
        **{name: (functools.partial(_mma, tile=tile), mma) for name, tile in tiles.items()},
        "awq_gemv": (lambda x, w: tm.awq_gemv(x, *w, GROUP, vec=1), awq),  # AutoAWQ's layout, <= 8 rows
        "awq_gemm": (lambda x, w: tm.awq_gemm(x, *w, GROUP), awq),  # AutoAWQ's layout, > 8 rows
        "dequant": (lambda x, w: torch_ops.awq_linear(x, *w, GROUP), awq),
    }
    rows = []
    for m in tqdm(args.rows, desc="row counts"):
        xs = {i: torch.randn(m, i, device="cuda").to(dtype) for i in {i for i, _ in LAYER.values()}}
        row = {"rows": m}
        for name, (fn, copies) in variants.items():
            if (name == "awq_gemm" and m <= tm.AWQ_GEMV_MAX_ROWS) or (name == "awq_gemv" and m > tm.AWQ_GEMV_MAX_ROWS):
                continue
            if name == "dense_gemv" and m > tm.DENSE_GEMV_MAX_ROWS:
                continue
            row[f"{name}_us"] = round(time_variant(fn, copies, xs, args.iters, args.eager) * 1e6, 1)
        if m == 1:  # each linear alone, and the bytes the W4A16 pass moves per second
            row["per_linear_us"] = {
                name: {v: round(time_variant(*variants[v], xs, args.iters, args.eager, (name,)) * 1e6, 1)
                       for v in ("bf16", "dense_gemv", "awq_gemv", "awq_repacked")} for name in LAYER}
            for v in ("awq", "awq_repacked"):
                row[f"{v}_tb_s"] = round(AWQ_BYTES / (row[f"{v}_us"] * 1e-6) / 1e12, 2)
        for name in variants:
            if f"{name}_us" in row and name != "bf16":
                row[f"{name}_over_bf16"] = round(row[f"{name}_us"] / row["bf16_us"], 3)
        rows.append(row)
        tqdm.write(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "layer": LAYER,
              "group_size": GROUP, "dtype": str(dtype), "timing": "eager" if args.eager else "cuda graph",
              "gemm_max_rows": tm.AWQ_GEMM_MAX_ROWS, "mma_max_rows": tm.AWQ_MMA_MAX_ROWS, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
