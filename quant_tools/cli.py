"""`lmq awq MODEL OUTPUT`: the AWQ quantization command."""

from __future__ import annotations

import argparse
import sys
import time

# On a CPU the scale search's 20 forward passes per group over all 128 x 512 calibration tokens
# take ~80 s per layer; over 16 blocks ~10 s (bench/awq.py compares the perplexities).
CPU_SEARCH_SAMPLES = 16


def add_awq_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("awq", help="quantize a model to 4 bits with AWQ (writes an AutoAWQ GEMM checkpoint)",
                       description="Quantize an HF Llama / Mistral / Qwen2 / Qwen3 folder (or a .gguf file, or "
                                   "'default' for the built-in model) to 4-bit AWQ: activation-aware scale search, "
                                   "weight-clipping search, AutoAWQ 'GEMM' packing. vLLM, transformers and lmq load "
                                   "the output folder.")
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, or 'default' (the built-in model)")
    p.add_argument("output", metavar="OUTPUT", help="folder to write (must not exist, or be empty)")
    p.add_argument("--calib-data", default=None, metavar="FILE",
                   help="calibration text: a text file (documents split at blank lines) or .jsonl with a 'text' "
                        "field (default: Wikipedia articles shipped in the gensim package)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration blocks (default: 128)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration block (default: 512)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits (default: 4; the only one supported)")
    p.add_argument("--group-size", type=int, default=128, help="input channels per quantization group (default: 128)")
    p.add_argument("--no-clip", action="store_true", help="skip the weight-clipping search")
    p.add_argument("--search-samples", type=int, default=None, metavar="N",
                   help="calibration blocks the scale search's loss is measured on (default: all of them on a "
                        f"GPU, {CPU_SEARCH_SAMPLES} on a CPU; the activation statistics always use every block)")
    p.add_argument("--device", default=None, help="where each layer is computed (default: cuda if available)")
    p.set_defaults(func=cmd_awq)


def _check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")


def cmd_awq(args: argparse.Namespace) -> int:
    import torch

    from lmq.weights import resolve_model
    from quant_tools.awq import AWQConfig, quantize_checkpoint
    from quant_tools.calibration import read_documents

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    search = args.search_samples or (CPU_SEARCH_SAMPLES if torch.device(device).type == "cpu" else None)
    config = AWQConfig(w_bits=args.w_bits, group_size=args.group_size, calib_samples=args.calib_samples,
                       calib_seqlen=args.calib_seqlen, clip=not args.no_clip, search_samples=search, device=device)
    documents = read_documents(args.calib_data) if args.calib_data else None
    model = resolve_model(None if args.model == "default" else args.model)
    start = time.perf_counter()
    out = quantize_checkpoint(model, args.output, config, documents)
    print(f"lmq awq: wrote {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
