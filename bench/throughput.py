"""Offline generation throughput: lmq's torch_engine against HF transformers `generate`
(batched, left-padded) on the same weights, in the same process, on the same device.

    python bench/throughput.py                                   # CPU, the built-in default model
    python bench/throughput.py --random-1b --batch-sizes 1 32 128   # GPU, Llama-3.2-1B-shaped random model

Prompts are random token ids of mixed lengths in [input_len / 2, input_len]; every request
generates exactly --output-len tokens (EOS ignored on both sides). Reported: generated tokens
per second, the ratio lmq / HF, and the KV-cache slot usage measured during lmq's run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.weights import resolve_model


def make_random_1b(folder: Path, tokenizer_dir: str, device: str) -> Path:
    """A random model shaped like Llama-3.2-1B (bf16), saved as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def make_prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(input_len // 2, 1), input_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, min(vocab, 32000), (n_,), generator=g).tolist() for n_ in lens]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_hf(folder: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # exactly output_len tokens, like lmq's ignore_eos
    return model


def run_hf(model: torch.nn.Module, prompts: list[list[int]], output_len: int, device: str,
           **generate_kwargs: object) -> float:
    """Seconds for HF `generate` on the prompts as one left-padded batch (`generate_kwargs`:
    more arguments, e.g. peft's `adapter_names`)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                       pad_token_id=0, **generate_kwargs)
    _sync(device)
    return time.perf_counter() - t


def run_lmq(llm: LLM, prompts: list[list[int]], output_len: int, measure_kv: bool) -> tuple[float, dict]:
    """Seconds for lmq to finish all prompts; with `measure_kv`, KV slot usage summed over steps."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    allocated = used = beyond = 0
    bs = engine.block_manager.block_size
    _sync(llm.engine.config.device)
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        if measure_kv:
            for s in engine.scheduler.running:
                a = len(engine.block_manager.block_table(s.seq_id)) * bs
                allocated += a
                used += s.num_computed_tokens
                beyond += a - -(-s.num_computed_tokens // bs) * bs
    _sync(llm.engine.config.device)
    kv = {"allocated_slot_steps": allocated, "used_slot_steps": used,
          "unused_share": 1 - used / max(allocated, 1), "beyond_last_partial_share": beyond / max(allocated, 1)}
    return time.perf_counter() - t, kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    ap.add_argument("--random-1b", action="store_true", help="use a random Llama-3.2-1B-shaped bf16 model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-1b (default: built-in model's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="auto", choices=["auto", "pytorch", "turbomind"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--profile", default=None, help="write a cProfile summary of lmq's timed runs here")
    args = ap.parse_args()

    tmp = None
    if args.random_1b:
        tmp = Path(tempfile.mkdtemp(prefix="lmq-1b-"))
        folder = str(make_random_1b(tmp, args.tokenizer or resolve_model(None), args.device))
    else:
        folder = resolve_model(args.model)
    llm = LLM(folder, device=args.device, dtype=args.dtype, max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=max(args.batch_sizes), backend=args.backend)
    dtype = llm.engine.config.model.dtype
    vocab = llm.engine.config.model.vocab_size
    hf = load_hf(folder, dtype, args.device)
    rows = []
    for b in tqdm(args.batch_sizes, desc="batch sizes"):
        prompts = make_prompts(b, args.input_len, vocab, seed=b)
        # Warm-ups on the same shapes (CUDA graphs, kernel choices, allocator), not timed.
        _, kv = run_lmq(llm, prompts, args.output_len, measure_kv=True)
        run_hf(hf, prompts, min(args.output_len, 8), args.device)
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        t_lmq, _ = run_lmq(llm, prompts, args.output_len, measure_kv=False)
        if prof:
            prof.disable()
            with open(args.profile, "a") as f:
                f.write(f"\n== batch {b}: {t_lmq:.3f} s\n")
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)
        t_hf = run_hf(hf, prompts, args.output_len, args.device)
        toks = b * args.output_len
        rows.append({"batch": b, "lmq_tok_s": toks / t_lmq, "hf_tok_s": toks / t_hf, "ratio": t_hf / t_lmq, **kv})
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nmodel={'random-1b' if args.random_1b else folder} device={dev} dtype={dtype} "
          f"backend={llm.engine.config.backend} "
          f"input_len<= {args.input_len} output_len={args.output_len}")
    print(f"{'batch':>5} {'lmq tok/s':>10} {'HF tok/s':>9} {'lmq/HF':>7} {'KV unused':>9} {'beyond partial':>14}")
    for r in rows:
        print(f"{r['batch']:>5} {r['lmq_tok_s']:>10.1f} {r['hf_tok_s']:>9.1f} {r['ratio']:>6.2f}x "
              f"{r['unused_share']:>8.1%} {r['beyond_last_partial_share']:>13.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "dtype": str(dtype), "backend": llm.engine.config.backend,
                                               "rows": rows}, indent=1))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
