"""Structured-output overhead: a batch where half the requests are JSON-schema constrained,
against the same batch unconstrained, same engine, same run.

    python bench/structured.py                                  # CPU, the built-in default model
    python bench/structured.py --device cuda --random-1b --tokenizer .gpu/tokenizer --batch-size 128

Every request generates exactly --output-len tokens, constrained or not, so the two batches do
the same model work: the constrained half each get their own schema (distinct property names:
one grammar each, compiled in the timed run) for an object holding an array of exactly
--output-len bounded integers, which no output finishes within its budget; the free half ignore
EOS. Reported: generated tokens per second of both batches and constrained / free (target on
the GPU: at least 0.9).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401  (first: see its docstring)
import torch
from throughput import make_prompts, make_random_1b

from lmq import LLM, SamplingParams
from lmq.structured import GuidedDecodingParams
from lmq.weights import resolve_model


def batch_params(n: int, output_len: int, constrained: bool, run: int) -> list[SamplingParams]:
    free = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True, seed=0)
    if not constrained:
        return [free] * n
    out = []
    for i in range(n):
        if i % 2:
            out.append(free)
            continue
        schema = {"type": "object", "required": [f"values_{run}_{i}"], "additionalProperties": False,
                  "properties": {f"values_{run}_{i}": {"type": "array", "minItems": output_len,
                                                       "maxItems": output_len,
                                                       "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}
        out.append(SamplingParams(temperature=1.0, max_tokens=output_len, seed=i, guided_decoding=(
            GuidedDecodingParams(json=schema, disable_any_whitespace=True))))
    return out


def timed(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], device: str) -> tuple[float, int]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    lengths = {len(o.outputs[0].token_ids) for o in outs}
    assert lengths == {params[0].max_tokens}, f"every request must generate max_tokens tokens, got {lengths}"
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the built-in model)")
    ap.add_argument("--random-1b", action="store_true", help="a random Llama-3.2-1B-shaped bf16 model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-1b (default: built-in model's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each batch, alternating; best kept")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    tmp = None
    if args.random_1b:
        tmp = Path(tempfile.mkdtemp(prefix="lmq-1b-"))
        folder = str(make_random_1b(tmp, args.tokenizer or resolve_model(None), args.device))
    else:
        folder = resolve_model(args.model)
    llm = LLM(folder, device=args.device, dtype=args.dtype, max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=args.batch_size)
    prompts = make_prompts(args.batch_size, args.input_len, llm.engine.config.model.vocab_size, seed=0)
    b, n = args.batch_size, args.output_len
    timed(llm, prompts, batch_params(b, n, True, -1), args.device)  # warm-up of both paths, untimed
    best = {"free": float("inf"), "constrained": float("inf")}
    tokens = 0
    for run in range(args.repeats):
        for kind in ("free", "constrained"):
            elapsed, tokens = timed(llm, prompts, batch_params(b, n, kind == "constrained", run), args.device)
            best[kind] = min(best[kind], elapsed)
    row = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "batch": b, "constrained_requests": (b + 1) // 2, "input_len": args.input_len, "output_len": n,
           "free_tok_s": tokens / best["free"], "constrained_tok_s": tokens / best["constrained"],
           "ratio": best["free"] / best["constrained"]}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
