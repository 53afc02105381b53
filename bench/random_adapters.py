"""Random, trained-looking peft LoRA folders for a base model (bench/lora.py's and
bench/profile_decode.py's adapters)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmq import LLM
from lora.adapter import module_shape

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(folder: Path, llm: LLM, rank: int, seed: int, device: str) -> Path:
    """A peft LoRA folder for the base model: rank `rank` on all seven projections."""
    cfg = llm.engine.config.model
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for i in range(cfg.num_layers):
        for name in PROJ:
            out, inp = module_shape(cfg, name)
            block = "self_attn" if name in PROJ[:4] else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, inp, generator=g, device=device) / inp ** 0.5)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g, device=device) * 0.02
    folder.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": PROJ, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "base_model_name_or_path": cfg.path, "inference_mode": True}))
    return folder
