"""`lmq awq`: quantize a Llama-family checkpoint to 4 bits with AWQ and write an AutoAWQ "GEMM"
checkpoint (quant_tools/awq_format.py) that lmq, vLLM and transformers load.

Layer by layer, with one decoder layer at a time on the device:

    calibration blocks [n, L] -> embeddings = layer 0's input X [n, L, D]
    for each decoder layer:
        run it on X with hooks: every linear's input; its output is the next layer's X
        search the AWQ scales of q|k|v, o (when v and o are square), gate|up, down; fold them in
        search the clipping range of every linear but q and k; clamp
        quantize each linear (round to nearest, zero point, groups of `group_size`)
    write the packed linears, the (rescaled) norms and the embeddings in float16

The output is written into a hidden folder beside OUTPUT and renamed to it only when complete:
a failed run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quant_tools import awq_format, calibration
from quant_tools.quantizer import ScaleGroup, apply_clip, apply_scale, quantize, search_clip, search_scale

log = logging.getLogger("lmq")

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # their error passes through q.k: AutoAWQ skips them too


@dataclass(frozen=True)
class AWQConfig:
    w_bits: int = 4
    group_size: int = 128
    calib_samples: int = 128
    calib_seqlen: int = 512
    clip: bool = True  # the weight-clipping search (LMDeploy skips it; lmq does not)
    # calibration blocks the scale search's loss is measured on (None: all of them); the
    # activation statistics always take every block
    search_samples: int | None = None
    search: bool = True  # False: plain round-to-nearest, no AWQ scales and no clipping (a baseline)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.w_bits != 4:
            raise ValueError(f"--w-bits {self.w_bits} is not supported: AutoAWQ's GEMM format is 4-bit only")
        if self.search_samples is not None and self.search_samples < 1:
            raise ValueError(f"--search-samples {self.search_samples} is invalid: must be >= 1")
        for name in ("group_size", "calib_samples", "calib_seqlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid: must be >= 1")


def check_model(hf_config: object, group_size: int) -> None:
    """Refuse what cannot be quantized, before anything is computed."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs or archs[0] not in SUPPORTED:
        raise ValueError(f"architecture {archs[0] if archs else None!r} is not supported by lmq awq: "
                         f"supported are {', '.join(SUPPORTED)}")
    if getattr(hf_config, "quantization_config", None):
        raise ValueError("the model is already quantized (its config.json has a quantization_config)")
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ins = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_attention_heads * head_dim": c.num_attention_heads * head_dim}
    for name, n in ins.items():
        if n % group_size:
            divisors = [g for g in (32, 64, 128) if all(v % g == 0 for v in ins.values())]
            raise ValueError(f"--group-size {group_size} does not divide {name}={n}"
                             + (f": use one of {divisors}" if divisors else ""))
    outs = {**ins, "num_key_value_heads * head_dim": c.num_key_value_heads * head_dim}
    for name, n in outs.items():
        if n % awq_format.PACK:
            raise ValueError(f"{name}={n} is not a multiple of {awq_format.PACK}: AWQ packs 8 output columns per int32")


def _prepare_output(output: Path) -> Path:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"OUTPUT {output} already exists and is not an empty folder: choose another path")
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


@torch.no_grad()
def quantize_checkpoint(model_path: str, output: str, config: AWQConfig,
                        documents: list[str] | None = None) -> Path:
    """Quantize `model_path` (an HF folder) into `output`; documents: calibration text (default:
    Wikipedia articles of quant_tools/wikitext.py). Returns the output folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(model_path)
    check_model(hf_config, config.group_size)
    out = Path(output)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    blocks = calibration.token_blocks(tokenizer, documents or calibration.default_documents(),
                                      config.calib_samples, config.calib_seqlen)  # [n, L]
    partial = _prepare_output(out)
    try:
        device = torch.device(config.device)
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").eval()
        tensors = _quantize_layers(model, blocks, config, device)
        _write(model, tensors, tokenizer, config, partial)
        if out.exists():
            out.rmdir()  # (checked empty above)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("lmq awq: %s -> %s in %.0f s (%d calibration blocks of %d tokens)", model_path, out,
             time.perf_counter() - start, blocks.shape[0], blocks.shape[1])
    return out


def _quantize_layers(model: nn.Module, blocks: torch.Tensor, config: AWQConfig,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Every decoder layer's linears, quantized: HF name -> qweight / qzeros / scales (/ bias)."""
    inner = model.model
    inner.embed_tokens.to(device)
    x = inner.embed_tokens(blocks.to(device))  # [n, L, D]
    inner.embed_tokens.cpu()
    positions = torch.arange(blocks.shape[1], device=device)[None]  # [1, L]
    inner.rotary_emb.to(device)
    rope = inner.rotary_emb(x, positions)  # (cos, sin) [1, L, head_dim]
    out: dict[str, torch.Tensor] = {}
    desc = "AWQ" if config.search else "round-to-nearest"
    for i, layer in enumerate(tqdm(inner.layers, desc=desc, unit="layer")):
        layer.to(device)
        x_next, inputs = _run_layer(layer, x, rope)
        if config.search:
            _search_and_fold(layer, inputs, rope, x.shape, config)
        for name in LINEARS:
            fc = layer.get_submodule(name)
            if config.search and config.clip and name not in NO_CLIP:
                apply_clip(fc, search_clip(fc.weight, inputs[name], config.group_size), config.group_size)
            out.update(_packed(f"model.layers.{i}.{name}", fc, config.group_size))
            fc.weight = nn.Parameter(fc.weight.new_empty(0), requires_grad=False)  # its fp copy is not needed again
        layer.cpu()
        x = x_next
    return out


def _run_layer(layer: nn.Module, x: torch.Tensor, rope: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output on x, and every linear's input [n * L, in] (fp weights: before any change)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name in LINEARS:
        def hook(_m: nn.Module, args: tuple, _y: torch.Tensor, name: str = name) -> None:
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])
        hooks.append(layer.get_submodule(name).register_forward_hook(hook))
    try:
        y = layer(x, attention_mask=None, position_embeddings=rope)
    finally:
        for h in hooks:
            h.remove()
    return (y[0] if isinstance(y, tuple) else y), inputs


def scale_groups(layer: nn.Module, inputs: dict[str, torch.Tensor], rope: tuple,
                 shape: torch.Size) -> list[ScaleGroup]:
    """AWQ's scale groups of one Llama-family decoder layer, each with the block whose output its
    search compares: q|k|v after the input norm (the attention), o after v (MHA only: o's input
    channels are v's output rows only when the two are square), gate|up after the post-attention
    norm (the MLP), down after up."""
    attn, mlp = layer.self_attn, layer.mlp
    _, seq, d = shape

    def attention(h: torch.Tensor) -> torch.Tensor:
        return attn(h.view(-1, seq, d), position_embeddings=rope, attention_mask=None)[0]

    groups = [ScaleGroup(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                         inputs["self_attn.q_proj"], attention)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup(attn.v_proj, [attn.o_proj], inputs["self_attn.o_proj"], attn.o_proj))
    groups.append(ScaleGroup(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj],
                             inputs["mlp.gate_proj"], mlp))
    groups.append(ScaleGroup(mlp.up_proj, [mlp.down_proj], inputs["mlp.down_proj"], mlp.down_proj))
    return groups


def _search_and_fold(layer: nn.Module, inputs: dict[str, torch.Tensor], rope: tuple, shape: torch.Size,
                     config: AWQConfig) -> None:
    """Search every group's scales on the original weights, then fold them all in; `inputs`
    becomes what each linear reads after the scaling (the clip search needs that)."""
    groups = scale_groups(layer, inputs, rope, shape)
    loss_tokens = None if config.search_samples is None else config.search_samples * shape[1]
    scales = [search_scale(g, config.group_size, loss_tokens=loss_tokens) for g in groups]
    for g, s in zip(groups, scales):
        apply_scale(g, s)
    for g in groups:
        for fc in g.linears:
            inputs[next(name for name in LINEARS if layer.get_submodule(name) is fc)] = g.inputs


def _packed(prefix: str, fc: nn.Linear, group_size: int) -> dict[str, torch.Tensor]:
    gq = quantize(fc.weight.data, group_size)
    t = {f"{prefix}.qweight": awq_format.pack(gq.q.t().contiguous()).cpu(),  # [in, out / 8]
         f"{prefix}.qzeros": awq_format.pack(gq.zeros.t().contiguous()).cpu(),  # [in / g, out / 8]
         f"{prefix}.scales": gq.scales.t().contiguous().cpu()}  # [in / g, out]
    if fc.bias is not None:
        t[f"{prefix}.bias"] = fc.bias.data.half().cpu()
    return t


def _write(model: nn.Module, packed: dict[str, torch.Tensor], tokenizer: object, config: AWQConfig,
           folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = dict(packed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if any(module.endswith(lin) for lin in LINEARS) or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = p.detach().half().contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["dtype"] = "float16"
    cfg.pop("torch_dtype", None)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": config.w_bits, "group_size": config.group_size,
                                  "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
