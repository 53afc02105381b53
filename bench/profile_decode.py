"""Where a decode step's time goes: a `torch.profiler` trace of decode steps of each engine
(torch_engine, turbomind) at several batch sizes, with CUDA graphs (and, with --eager, without:
issue 16's "profile before optimizing").

    python bench/profile_decode.py --random-1b --batch-sizes 1 128 --json out.json --tables out.txt
    python bench/profile_decode.py --random-1b --backends turbomind --batch-sizes 32 --adapters 0 8 64

With --adapters, each count N profiles again with every sequence on one of N rank-16 adapters
(bench/lora.py's random peft folders on all seven projections, sequence i on adapter i mod N;
0: the base model on the same LoRA-enabled engine), to show what the LoRA kernels cost.

For each batch size: every sequence is first prefilled (128-token random prompts), then a few
decode steps warm up and --steps decode steps are traced. Reported per step: wall time (host
clock around `engine.step()`, device synchronized), GPU busy time (the sum of the traced kernels'
durations), their ratio, and the number of kernels launched; plus the kernels that take the most
GPU time. GPU busy time well below wall time means the step waits on the host (launches, Python);
a kernel count in the hundreds per step points at fusing kernels more than at faster ones.

With --host-profile, the steps run instead under cProfile, the device not synchronized between
them (as the engine runs them; with --async-scheduling, step n+1's host work overlaps step n),
and the table lists the host functions that take the most time (what a host-bound step waits on).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from random_adapters import write_adapter
from throughput import make_prompts, make_random_1b
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.weights import resolve_model


def _decode_ready(llm: LLM, prompts: list[list[int]], warmup: int, adapters: int = 0) -> None:
    """Add the prompts and step until every sequence is decoding, then `warmup` more steps."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)  # within max_model_len (input + 512)
    for i, p in enumerate(prompts):
        name = f"a{i % adapters}" if adapters else None
        engine.add_request(f"p{time.monotonic_ns()}-{i}", p, params, adapter=name)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    for _ in range(warmup):
        engine.step()


def _profile_steps(llm: LLM, steps: int) -> tuple[dict, str]:
    engine = llm.engine
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)  # microseconds, every traced device event
    wall_ms = 1e3 * sum(walls) / steps
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=20)
    return {"wall_ms_per_step": wall_ms, "gpu_ms_per_step": gpu_us / 1e3 / steps,
            "gpu_busy_share": gpu_us / 1e3 / steps / wall_ms, "kernels_per_step": len(kernels) / steps}, table


def _host_profile_steps(llm: LLM, steps: int) -> tuple[dict, str]:
    """`steps` engine steps under cProfile, synchronized only before and after all of them."""
    engine = llm.engine
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    prof.disable()
    wall_ms = 1e3 * (time.perf_counter() - t) / steps
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    return {"wall_ms_per_step": wall_ms}, text.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the built-in model)")
    ap.add_argument("--random-1b", action="store_true", help="a random Llama-3.2-1B-shaped bf16 model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-1b (default: built-in model's)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=["pytorch", "turbomind"], choices=["pytorch", "turbomind"])
    ap.add_argument("--adapters", type=int, nargs="+", default=None,
                    help="profile with sequences spread over N rank-16 adapters for each N (0: base model)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the --adapters adapters")
    ap.add_argument("--eager", action="store_true", help="also profile without CUDA graphs")
    ap.add_argument("--async-scheduling", action="store_true", help="engines with async scheduling")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the host instead of tracing kernels (no synchronization between steps)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tables", default=None, help="write the profiler's top-kernel tables here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py traces CUDA kernels: it needs a CUDA GPU")
    tmp = Path(tempfile.mkdtemp(prefix="lmq-prof-"))
    if args.random_1b:
        folder = str(make_random_1b(tmp, args.tokenizer or resolve_model(None), "cuda"))
    else:
        folder = resolve_model(args.model)
    rows, tables = [], []
    for backend in args.backends:
        for graphs in (True, False) if args.eager else (True,):
            counts = args.adapters or [0]
            slots = max(1, min(max(counts), max(args.batch_sizes)))  # as bench/lora.py
            lora = {} if args.adapters is None else {"enable_lora": True, "max_loras": slots,
                                                      "max_cpu_loras": max(max(counts), slots),
                                                      "max_lora_rank": args.rank}
            llm = LLM(folder, device="cuda", dtype="bfloat16", max_num_seqs=max(args.batch_sizes),
                      max_model_len=args.input_len + 512, enable_cuda_graph=graphs, backend=backend,
                      async_scheduling=args.async_scheduling, **lora)
            vocab = llm.engine.config.model.vocab_size
            for i in tqdm(range(max(counts)), desc="adapters", disable=not max(counts)):
                llm.load_adapter(f"a{i}", str(write_adapter(tmp / f"a{i}", llm, args.rank, i, "cuda")))
            for b, n in tqdm([(b, n) for b in args.batch_sizes for n in counts],
                             desc=f"{backend}, cuda graphs {'on' if graphs else 'off'}"):
                _decode_ready(llm, make_prompts(b, args.input_len, vocab, seed=b), warmup=5, adapters=n)
                stats, table = (_host_profile_steps if args.host_profile else _profile_steps)(llm, args.steps)
                for rid in list(llm.engine.requests):
                    llm.engine.abort(rid)
                rows.append({"backend": backend, "batch": b, "adapters": n, "cuda_graphs": graphs,
                             "async_scheduling": args.async_scheduling, **stats})
                what = (f"{backend}, batch {b}, {n} adapters, CUDA graphs {'on' if graphs else 'off'}"
                        f"{', async scheduling' if args.async_scheduling else ''}")
                tables.append(f"== {what}\n{table}")
                if args.host_profile:
                    print(f"{what}: wall {stats['wall_ms_per_step']:.2f} ms per step (under cProfile)")
                else:
                    print(f"{what}: wall {stats['wall_ms_per_step']:.2f} ms, GPU {stats['gpu_ms_per_step']:.2f} ms "
                          f"({100 * stats['gpu_busy_share']:.0f}%), {stats['kernels_per_step']:.0f} kernels/step")
            del llm
            torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "model": "random Llama-3.2-1B shape" if args.random_1b else folder, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.tables:
        Path(args.tables).write_text("\n\n".join(tables))


if __name__ == "__main__":
    main()
