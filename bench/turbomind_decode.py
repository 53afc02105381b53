"""turbomind against torch_engine and the memory roofline, same weights, same process (issue 16).

    python bench/turbomind_decode.py --shape 1b --tokenizer TOK --json out.json
    python bench/turbomind_decode.py --shape 8b --tokenizer TOK --batch-sizes 1 --skip-attention

Random weights in the Llama-3.2-1B or Llama-3-8B shape, bf16. Reported:
- copy bandwidth: a 1 GiB device-to-device copy (read + write bytes / time), best of 5;
- decode tok/s of each engine at each batch size, decode steps only: the time of a run of
  output_len tokens minus that of a run of one token, over batch * (output_len - 1) tokens;
  `--backends ... hf` adds transformers' `generate` (greedy, equal-length prompts so no padding,
  same weights, its default dynamic cache) measured the same way; `NAME-async` backends run
  with --async-scheduling, and `async_over_sync` compares them with the same engine without;
- batch-1 decode against the roofline: (weight bytes + KV bytes read per step) / copy bandwidth;
- decode attention alone at batch 64 x 4,096 context (32 / 8 heads, head_dim 128): K and V
  bytes / kernel time, as a share of the copy bandwidth; and at batch 1 x 192 keys (the 1B
  shape) for each split-K threshold (MIN_SPLIT_TOKENS), to choose it;
- with --prefill N: each lmq engine's prefill of one N-token prompt (the time to its first
  token, best of 3) as a share of the measured matmul rate (a bf16 8192^3 matmul): the
  projections' 2 * T * params FLOPs plus causal attention's 2 * 2 * layers * H * D * T^2 / 2;
- with --awq: the same model round-to-nearest quantized to an AutoAWQ GEMM checkpoint (group
  128, float16 activations), batch-1 decode on turbomind against the bf16 model's (issue 13), in
  AutoAWQ's layout (awq_gemv) and repacked for awq_mma (turbomind.ops.AWQ_MMA).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.config import SchedulerConfig
from turbomind import ops as tm_ops

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
}


def make_model(folder: Path, shape: str, tokenizer_dir: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def make_awq(dense: Path, out: Path, group_size: int = 128) -> Path:
    """An AutoAWQ GEMM checkpoint of `dense` by round-to-nearest (lmq awq's packing and writer,
    without its calibration: the benchmark measures speed, not accuracy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant_tools.awq import LINEARS, AWQConfig, _packed, _write

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16).cuda()
    packed: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(model.model.layers, desc="RTN AWQ")):
        for name in LINEARS:
            packed |= _packed(f"model.layers.{i}.{name}", layer.get_submodule(name), group_size)
    out.mkdir(parents=True)
    _write(model, packed, AutoTokenizer.from_pretrained(dense), AWQConfig(group_size=group_size), out)
    del model
    torch.cuda.empty_cache()
    return out


def _best_seconds(fn, runs: int) -> float:
    """The fastest of `runs` synchronized calls of `fn`, in seconds."""
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_seconds(lambda: dst.copy_(src), 6)


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of a bf16 n x n x n torch matmul (cuBLAS), best of 5 after a warm-up."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    a @ b
    return 2 * n ** 3 / _best_seconds(lambda: a @ b, 5)


def prefill_share(llm: LLM, tokens: int, rate: float) -> dict:
    """One `tokens`-long prompt's prefill (time to the first token, best of 3 after a warm-up)
    against `rate`: the FLOPs of the projections and of causal attention over that time. Each
    call gets a prompt of its own, so no prefix-cache hit skips the work. Also the kernel
    time of one more prefill under torch.profiler (`gpu_ms`, `kernels`, and its top kernels
    as `table`), to tell host overhead from slow kernels."""
    cfg = llm.engine.config.model
    timed_generate(llm, bench_prompts(1, tokens, seed=1000), 1)  # warm-up
    sec = min(timed_generate(llm, bench_prompts(1, tokens, seed=1001 + i), 1) for i in range(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_generate(llm, bench_prompts(1, tokens, seed=1010), 1)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    layer_params = sum(p.numel() for n, p in llm.engine.runner.model.named_parameters()
                       if n.startswith("layers.") and p.dim() == 2)
    heads, head_dim = cfg.num_heads, cfg.head_dim
    flops = 2 * tokens * layer_params + 2 * 2 * cfg.num_layers * heads * head_dim * tokens ** 2 / 2
    return {"tokens": tokens, "ms": sec * 1e3, "tflop_s": flops / sec / 1e12,
            "share_of_matmul_rate": flops / sec / rate,
            "gpu_ms": sum(e.device_time for e in kernels) / 1e3, "kernels": len(kernels),
            "table": prof.key_averages().table(sort_by="device_time_total", row_limit=15)}


def bench_prompts(batch: int, input_len: int, seed: int | None = None) -> list[list[int]]:
    """The batch's random prompts, the same for every engine (seeded by the batch size, or `seed`)."""
    g = torch.Generator().manual_seed(batch if seed is None else seed)
    return [torch.randint(3, 32000, (input_len,), generator=g).tolist() for _ in range(batch)]


def timed_generate(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def decode_tok_s(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    timed_generate(llm, prompts, output_len)  # warm-up: graphs, allocator
    full = min(timed_generate(llm, prompts, output_len) for _ in range(2))
    first = min(timed_generate(llm, prompts, 1) for _ in range(2))
    return len(prompts) * (output_len - 1) / (full - first)


def hf_decode_tok_s(folder: Path, prompts: list[list[int]], output_len: int, device: str = "cuda") -> float:
    """transformers' batched greedy `generate` on the same weights: decode tok/s as decode_tok_s."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # [batch, input_len]: equal lengths, no padding

    def run(n: int) -> float:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        sync()
        assert out.shape == (len(prompts), ids.shape[1] + n), out.shape
        return time.perf_counter() - t

    run(output_len)  # warm-up
    full, first = run(output_len), min(run(1) for _ in range(2))
    return len(prompts) * (output_len - 1) / (full - first)


def weight_bytes(llm: LLM) -> int:
    """Bytes a decode step reads: every parameter once (a tied embedding is the LM head's read;
    an untied input embedding reads one row, counted as nothing)."""
    model = llm.engine.runner.model
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or ("embed_tokens" in name and not llm.engine.config.model.tie_word_embeddings):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def attention_alone(bandwidth: float) -> dict:
    from turbomind import ops
    from turbomind.launch import DECODE_STAGE_SWEEP

    b, ctx, h, hkv, d, bs = 64, 4096, 32, 8, 128, 16
    nb = ctx // bs
    g = torch.Generator("cuda").manual_seed(0)
    kc = torch.randn(b * nb, bs, hkv, d, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.randperm(b * nb, device="cuda", generator=g).view(b, nb).int()
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(b, h, d, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    kv_bytes = 2 * kc.numel() * kc.element_size()

    def timed() -> float:  # seconds a call, 20 calls after 3 (compiling, warming)
        for _ in range(3):
            ops.decode_attention(q, kc, vc, tables, lens, d ** -0.5, None, out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            ops.decode_attention(q, kc, vc, tables, lens, d ** -0.5, None, out)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / 20

    default, secs = ops.DECODE_STAGES, {}
    try:
        for stages in DECODE_STAGE_SWEEP:  # decode_attention.cu's cp.async pipeline depth
            ops.DECODE_STAGES = stages
            secs[stages] = timed()
    finally:
        ops.DECODE_STAGES = default
    sec = secs[default] if default in secs else timed()
    by_stages = {stages: kv_bytes / t / bandwidth for stages, t in secs.items()}
    return {"batch": b, "context": ctx, "us": sec * 1e6, "kv_gb_s": kv_bytes / sec / 1e9,
            "share_of_copy_bandwidth": kv_bytes / sec / bandwidth, "stages": default,
            "share_by_stages": by_stages}


def short_context_splits(ctx: int = 192, calls: int = 50) -> dict[int, float]:
    """Batch-1 decode attention over `ctx` keys in the 1B shape (32 / 8 heads, head_dim 64, blocks
    of 16) for each turbomind.ops.MIN_SPLIT_TOKENS: us per call (the split reduce included),
    from a CUDA graph of `calls` calls, so the host's launch gaps are not counted."""
    from turbomind import ops

    h, hkv, d, bs = 32, 8, 64, 16
    nb = -(-ctx // bs)
    g = torch.Generator("cuda").manual_seed(1)
    kc = torch.randn(nb, bs, hkv, d, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.arange(nb, device="cuda", dtype=torch.int32)[None]
    lens = torch.full((1,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(1, h, d, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    default, times = ops.MIN_SPLIT_TOKENS, {}
    try:
        for min_split in (256, 128, 64, 32):
            ops.MIN_SPLIT_TOKENS = min_split
            ops.decode_attention(q, kc, vc, tables, lens, d ** -0.5, None, out)  # compiled outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    ops.decode_attention(q, kc, vc, tables, lens, d ** -0.5, None, out)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[min_split] = start.elapsed_time(end) * 1e3 / (5 * calls)
    finally:
        ops.MIN_SPLIT_TOKENS = default
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder saved with the random model")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--backends", nargs="+", default=["turbomind", "pytorch"],
                    help="lmq backends (NAME-async: with --async-scheduling), and hf for transformers' generate")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--prefill", type=int, default=0, help="also time one prompt of this many tokens (0: skip)")
    ap.add_argument("--awq", action="store_true", help="also batch-1 decode of an AWQ copy on turbomind, in "
                    "AutoAWQ's layout (turbomind-awq) and repacked for awq_mma (turbomind-awq-mma)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    bandwidth = copy_bandwidth()
    rate = matmul_rate() if args.prefill else float("nan")
    tmp = Path(tempfile.mkdtemp(prefix="lmq-tm-"))
    folder = make_model(tmp, args.shape, args.tokenizer)
    runs = [(b, folder, "bfloat16") for b in args.backends]
    if args.awq:
        awq = make_awq(folder, tmp / "awq")
        runs += [("turbomind-awq", awq, "float16"), ("turbomind-awq-mma", awq, "float16")]
    rows, prefills = [], {}
    for backend, model_dir, dtype in runs:
        if backend == "hf":  # the roofline columns are the engines'; HF's row is its tok/s
            for b in tqdm(args.batch_sizes, desc="hf batch sizes"):
                tok_s = hf_decode_tok_s(model_dir, bench_prompts(b, args.input_len), args.output_len)
                rows.append({"backend": "hf", "batch": b, "decode_tok_s": tok_s})
                print(json.dumps(rows[-1]))
            gc.collect()
            torch.cuda.empty_cache()
            continue
        tm_ops.AWQ_MMA = backend.endswith("-awq-mma")  # awq_pack's layout, read when the model loads
        llm = LLM(str(model_dir), device="cuda", dtype=dtype,
                  backend=backend.removesuffix("-mma").removesuffix("-awq").removesuffix("-async"),
                  async_scheduling=backend.endswith("-async"), gpu_memory_utilization=0.4,
                  max_model_len=max(args.input_len + args.output_len, args.prefill) + 16,
                  max_num_seqs=max(args.batch_sizes),
                  max_num_batched_tokens=max(SchedulerConfig.max_num_batched_tokens, args.prefill))
        step_weights = weight_bytes(llm)
        kv_per_token = llm.engine.config.model.kv_bytes_per_token
        awq_run = "-awq" in backend
        for b in tqdm([1] if awq_run else args.batch_sizes, desc=f"{backend} batch sizes"):
            tok_s = decode_tok_s(llm, bench_prompts(b, args.input_len), args.output_len)
            avg_ctx = args.input_len + args.output_len / 2
            step_bytes = step_weights + b * avg_ctx * kv_per_token
            roofline_tok_s = b * bandwidth / step_bytes
            rows.append({"backend": backend, "batch": b, "decode_tok_s": tok_s, "roofline_tok_s": roofline_tok_s,
                         "share_of_roofline": tok_s / roofline_tok_s})
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}))
        if args.prefill and not awq_run:
            prefills[backend] = prefill_share(llm, args.prefill, rate)
            print(prefills[backend].pop("table"))
            print(json.dumps({"backend": backend, "prefill": prefills[backend]}))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
              "copy_gb_s": bandwidth / 1e9, "matmul_tflop_s": rate / 1e12, "prefill": prefills,
              "input_len": args.input_len, "output_len": args.output_len, "rows": rows}
    by = {(r["backend"], r["batch"]): r["decode_tok_s"] for r in rows}
    for awq_run in ("turbomind-awq", "turbomind-awq-mma"):
        if (awq_run, 1) in by and ("turbomind", 1) in by:
            result[f"{awq_run.removeprefix('turbomind-')}_over_bf16_batch1"] = by[(awq_run, 1)] / by[("turbomind", 1)]
    result["turbomind_over_pytorch"] = {b: by[("turbomind", b)] / by[("pytorch", b)] for b in args.batch_sizes
                                        if ("turbomind", b) in by and ("pytorch", b) in by}
    result["turbomind_over_hf"] = {b: by[("turbomind", b)] / by[("hf", b)] for b in args.batch_sizes
                                   if ("turbomind", b) in by and ("hf", b) in by}
    result["async_over_sync"] = {f"{e}@{b}": by[(f"{e}-async", b)] / by[(e, b)] for e in ("turbomind", "pytorch")
                                 for b in args.batch_sizes if (e, b) in by and (f"{e}-async", b) in by}
    if not args.skip_attention:
        result["decode_attention"] = attention_alone(bandwidth)
        result["batch1_attention_us_by_min_split_tokens"] = short_context_splits()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
