"""AWQ quality and cost on the built-in default model (SmolLM2-135M-Instruct, the real weights):
perplexity on held-out Wikipedia articles (quant_tools/wikitext.py's held-out share, never used
for calibration) of the model as shipped, of its AWQ checkpoint and of plain round-to-nearest at
the same bits and group size, all through lmq's prompt logprobs; and the time `lmq awq` takes.

    python bench/awq.py --group-size 64 --json bench/results/awq_cpu.json
    python bench/awq.py --awq-dir DIR ...   # reuse a checkpoint of `lmq awq default DIR`

(576, the model's hidden size, is not a multiple of 128: groups of 64 are the largest that fit.)
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from tqdm.auto import tqdm

from lmq import LLM, SamplingParams
from lmq.weights import resolve_model
from quant_tools.awq import AWQConfig, quantize_checkpoint
from quant_tools.wikitext import split


def held_out_windows(model: str, windows: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids: list[int] = []
    for doc in split(held_out=True):
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= windows * length:
            break
    n = min(windows, len(ids) // length)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def perplexity(folder: str, windows: list[list[int]], device: str, dtype: str) -> float:
    """exp of the mean negative log-likelihood of every token after the first of each window."""
    llm = LLM(folder, device=device, dtype=dtype, kv_cache_gb=1.0)
    nll, count = 0.0, 0
    outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0))
    for w, out in zip(windows, outs):
        for i in range(1, len(w)):
            nll -= out.prompt_logprobs[i][w[i]].logprob
            count += 1
    del llm
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--awq-dir", default=None, help="an AWQ checkpoint of the default model to reuse")
    ap.add_argument("--windows", type=int, default=40, help="held-out windows scored")
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--search-samples", type=int, default=None,
                    help="for the AWQ run (default: what `lmq awq` does on this device)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    base = resolve_model(None)
    dtype = "float32" if args.device == "cpu" else "float16"
    windows = held_out_windows(base, args.windows, args.window_len)
    result: dict = {"model": "SmolLM2-135M-Instruct (built-in)", "device": torch.cuda.get_device_name()
                    if args.device != "cpu" else "cpu", "dtype": dtype, "group_size": args.group_size,
                    "held_out_tokens": sum(len(w) - 1 for w in windows), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        search = args.search_samples or (16 if args.device == "cpu" else None)
        runs = {"awq": AWQConfig(group_size=args.group_size, search_samples=search, device=args.device),
                "rtn": AWQConfig(group_size=args.group_size, search=False, device=args.device)}
        folders = {"fp": base}
        for name, cfg in tqdm(runs.items(), desc="quantize", unit="model"):
            if name == "awq" and args.awq_dir:
                folders[name] = args.awq_dir
                continue
            start = time.perf_counter()
            folders[name] = str(quantize_checkpoint(base, str(Path(tmp) / name), cfg))
            result[f"{name}_quantize_s"] = round(time.perf_counter() - start, 1)
        result["awq_search_samples"] = search
        for name, folder in tqdm(folders.items(), desc="perplexity", unit="model"):
            result[f"{name}_ppl"] = round(perplexity(folder, windows, args.device, dtype), 3)
    fp = result["fp_ppl"]
    for name in ("awq", "rtn"):
        result[f"{name}_ppl_increase"] = round(result[f"{name}_ppl"] - fp, 3)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
