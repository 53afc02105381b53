"""Multi-LoRA throughput: lmq's torch_engine with uniform traffic over N adapters, against the
base model alone on the same engine and against peft's mixed-adapter `generate(adapter_names=)`,
in the same process, on the same device; plus adapter swap-in latency.

    python bench/lora.py --random-1b --num-adapters 8 64 512      # GPU (device tool)
    python bench/lora.py --num-adapters 4 --requests 16 --output-len 16 --peft-batches 1   # CPU smoke run

Every adapter is rank --rank on all seven projections (random, trained-looking weights written
as peft folders). --requests prompts (random token ids, input_len/2..input_len tokens) each
pick an adapter uniformly at random and generate exactly --output-len tokens; lmq runs them
with max_num_seqs = --batch, peft in left-padded batches of --batch (only the adapters its
batches use are loaded into peft). Swap-in: reading an adapter from disk, and copying it from
host memory into a device slot.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from random_adapters import write_adapter
from throughput import _sync, load_hf, make_prompts, make_random_1b, run_hf
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.weights import resolve_model


def run_lmq(llm: LLM, prompts: list[list[int]], names: list[str | None], output_len: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    _sync(llm.engine.config.device)
    t = time.perf_counter()
    llm.generate(prompts, params, adapter=names)
    _sync(llm.engine.config.device)
    return time.perf_counter() - t


def run_peft(base: torch.nn.Module, paths: dict[str, Path], prompts: list[list[int]], names: list[str],
             output_len: int, batch: int, device: str) -> float:
    """peft's mixed-adapter generate over the same requests, in left-padded batches."""
    from peft import PeftModel

    used = sorted(set(names))
    model = PeftModel.from_pretrained(base, str(paths[used[0]]), adapter_name=used[0])
    for n in tqdm(used[1:], desc="peft: loading adapters", leave=False):
        model.load_adapter(str(paths[n]), adapter_name=n)
    model.eval()
    total = sum(run_hf(model, prompts[i:i + batch], output_len, device, adapter_names=names[i:i + batch])
                for i in range(0, len(prompts), batch))
    model.unload()  # the base model without adapter layers, for the next N
    return total


def swap_in(llm: LLM, paths: list[Path], device: str) -> dict:
    """Disk -> host (read, validate and pack) and host -> device slot copy, milliseconds (median)."""
    manager, reads, copies = llm.engine.adapters, [], []
    for p in paths[:8]:
        t = time.perf_counter()
        weights = manager.pack(manager.read(str(p)))
        reads.append(time.perf_counter() - t)
        _sync(device)
        t = time.perf_counter()
        llm.engine.runner.load_lora_slot(0, weights)
        _sync(device)
        copies.append(time.perf_counter() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    out = {"disk_read_ms": med(reads), "slot_copy_ms": med(copies)}
    if str(device).startswith("cuda"):  # where the copy's time goes: GPU time and launches of one load
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.engine.runner.load_lora_slot(0, weights)
            _sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["profile_gpu_ms"] = sum(e.device_time for e in kernels) / 1e3
        out["profile_kernels"] = len(kernels)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    llm.engine.runner.load_lora_slot(0, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the built-in model)")
    ap.add_argument("--random-1b", action="store_true", help="use a random Llama-3.2-1B-shaped bf16 model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-adapters", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--peft-batches", type=int, default=1, help="peft runs this many batches (it is slow; 0: skip)")
    ap.add_argument("--backend", default="auto", choices=["auto", "pytorch", "turbomind"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lmq-lora-"))
    try:
        folder = str(make_random_1b(tmp / "base", args.tokenizer or resolve_model(None), args.device)) \
            if args.random_1b else resolve_model(args.model)
        max_n = max(args.num_adapters)
        llm = LLM(folder, device=args.device, max_model_len=args.input_len + args.output_len + 16,
                  max_num_seqs=args.batch, enable_lora=True, max_loras=min(max_n, args.batch),
                  max_lora_rank=args.rank, max_cpu_loras=max(max_n, args.batch), backend=args.backend)
        dev, vocab = llm.engine.config.device, llm.engine.config.model.vocab_size
        paths = [write_adapter(tmp / f"a{i}", llm, args.rank, i, dev)
                 for i in tqdm(range(max_n), desc="writing adapters")]
        for i, p in enumerate(tqdm(paths, desc="loading adapters into lmq")):
            llm.load_adapter(f"a{i}", str(p))
        prompts = make_prompts(args.requests, args.input_len, vocab, seed=0)
        toks = args.requests * args.output_len
        run_lmq(llm, prompts[:args.batch], [None] * args.batch, 8)  # warm-up: graphs, allocator
        t_base = run_lmq(llm, prompts, [None] * args.requests, args.output_len)
        hf = load_hf(folder, llm.engine.config.model.dtype, dev) if args.peft_batches else None
        rows = []
        for n in tqdm(args.num_adapters, desc="adapter counts"):
            rng = random.Random(n)
            names = [f"a{rng.randrange(n)}" for _ in prompts]
            run_lmq(llm, prompts[:args.batch], names[:args.batch], 8)  # warm-up at this rank bucket
            loads0 = llm.engine.adapters.num_slot_loads
            t_lmq = run_lmq(llm, prompts, names, args.output_len)
            k = args.peft_batches * args.batch
            peft_tok_s = float("nan")
            if k:
                t_peft = run_peft(hf, {f"a{i}": p for i, p in enumerate(paths)}, prompts[:k], names[:k],
                                  args.output_len, args.batch, dev)
                peft_tok_s = k * args.output_len / t_peft
            rows.append({"adapters": n, "lmq_tok_s": toks / t_lmq, "base_tok_s": toks / t_base,
                         "peft_tok_s": peft_tok_s, "vs_base": t_base / t_lmq, "vs_peft": toks / t_lmq / peft_tok_s,
                         "slot_loads": llm.engine.adapters.num_slot_loads - loads0})
        swap = swap_in(llm, paths, dev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = torch.cuda.get_device_name() if str(dev).startswith("cuda") else "CPU"
    print(f"\nmodel={'random-1b' if args.random_1b else folder} backend={llm.engine.config.backend} device={name} "
          f"rank={args.rank} batch={args.batch} "
          f"requests={args.requests} input_len<={args.input_len} output_len={args.output_len}")
    print(f"{'adapters':>8} {'lmq tok/s':>10} {'base tok/s':>10} {'peft tok/s':>10} {'lmq/base':>8} "
          f"{'lmq/peft':>8} {'slot loads':>10}")
    for r in rows:
        print(f"{r['adapters']:>8} {r['lmq_tok_s']:>10.1f} {r['base_tok_s']:>10.1f} {r['peft_tok_s']:>10.1f} "
              f"{r['vs_base']:>7.1%} {r['vs_peft']:>7.1f}x {r['slot_loads']:>10}")
    print(f"swap-in: disk read {swap['disk_read_ms']:.1f} ms, host->slot copy {swap['slot_copy_ms']:.2f} ms")
    if "profile_gpu_ms" in swap:
        print(f"one slot load under the profiler: {swap['profile_gpu_ms']:.2f} ms of GPU time, "
              f"{swap['profile_kernels']} GPU operations")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": rows, "swap_in": swap},
                                              indent=1))


if __name__ == "__main__":
    main()
