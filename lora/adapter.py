"""Reading a peft LoRA adapter folder and checking that it fits the base model.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`). Each LoRA
module `m` of layer `i` has A: [r, in] and B: [out, r], and adds `scale * B @ A @ x` to the
projection's output, with scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). The scale is
folded into B here (kept transposed, as the slot stacks hold it), so the engine computes
`B' @ (A @ x)`.

Refused, with the reason: DoRA, trained biases, `modules_to_save`, targets other than the seven
attention/MLP projections (embeddings, lm_head), ranks above `max_lora_rank`, shapes that do not
fit the base model, non-LoRA peft types.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # lmq imports lora at run time, not the other way round
    from lmq.config import ModelConfig

# peft module name -> (our fused projection, part index within it)
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served; the message says why."""


@dataclass(frozen=True)
class LoRAModule:
    a: torch.Tensor  # [r, in], in the file's dtype
    bt: torch.Tensor  # [r, out]: B transposed (the slot stacks' layout), scale folded in

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter's weights in host memory, keyed by (layer, peft module name)."""

    path: str
    modules: dict[tuple[int, str], LoRAModule]

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def module_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(out, in) of a peft-named projection of the base model."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}[name]


def read_adapter(path: str | Path, cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
    """Load and validate a peft LoRA folder for the base model `cfg`. Raises AdapterError."""
    folder = Path(path)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{folder} is not a peft adapter: adapter_config.json is missing")
    try:
        acfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file} is not valid JSON: {e}") from None
    _check_config(acfg)
    tensors = _read_tensors(folder)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "vision_tower" in key or "multi_modal_projector" in key:  # (their layers would match _KEY too)
            raise AdapterError(f"unsupported adapter tensor {key!r}: lmq applies LoRA to the language model "
                               "only, not to a vision tower or projector")
        m = _KEY.search(key)
        if m is None or m.group(2) not in PROJECTIONS:
            raise AdapterError(f"unsupported adapter tensor {key!r}: lmq applies LoRA to the "
                               f"{', '.join(PROJECTIONS)} projections only")
        layer, name, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.num_layers:
            raise AdapterError(f"adapter tensor {key!r} is for layer {layer} but the base model has "
                               f"{cfg.num_layers} layers")
        pairs.setdefault((layer, name), {})[ab] = t
    if not pairs:
        raise AdapterError(f"{folder} holds no LoRA weights")
    modules = {}
    for (layer, name), ab in pairs.items():
        modules[(layer, name)] = _module(acfg, layer, name, ab, cfg, max_rank)
    return LoRAAdapter(str(folder), modules)


def _check_config(acfg: dict) -> None:
    if acfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type={acfg.get('peft_type')!r} is not supported: only LORA adapters")
    if acfg.get("use_dora"):
        raise AdapterError("use_dora=true is not supported: DoRA adapters need the weight magnitudes")
    if acfg.get("bias", "none") != "none":
        raise AdapterError(f"bias={acfg['bias']!r} is not supported: only adapters with bias='none'")
    if acfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save={acfg['modules_to_save']!r} is not supported: the adapter "
                           "replaces whole modules of the base model")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or corrupt file
        raise AdapterError(f"cannot read the adapter weights in {folder}: {e}") from None
    raise AdapterError(f"{folder} has no adapter_model.safetensors or adapter_model.bin")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: a key matches the module name's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module(acfg: dict, layer: int, name: str, ab: dict[str, torch.Tensor], cfg: ModelConfig,
            max_rank: int) -> LoRAModule:
    where = f"layers.{layer}.{name}"
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{where}: lora_{'A' if 'A' not in ab else 'B'} is missing")
    a, b = ab["A"], ab["B"]
    r = a.shape[0]
    out, inp = module_shape(cfg, name)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != inp or b.shape != (out, r):
        raise AdapterError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base "
                           f"model's {name} of shape ({out}, {inp}): expected ({r}, {inp}) and ({out}, {r})")
    if r > max_rank:
        raise AdapterError(f"{where}: rank {r} exceeds max_lora_rank={max_rank}")
    full = f"model.layers.{layer}.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{name}"
    alpha = _pattern_value(acfg.get("alpha_pattern"), full, acfg.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{where}: weights must be floating point, got {a.dtype} and {b.dtype}")
    # Kept in the file's dtype (host memory); the scale is applied in float32 before rounding back.
    return LoRAModule(a.contiguous(), (b.float() * scale).to(b.dtype).T.contiguous())
