"""peft adapters for the tiny test models, and peft's greedy outputs as the reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from conftest import SEED

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: int
    targets: tuple[str, ...]
    rslora: bool = False


# Different ranks (4..64), target sets, alphas, and one rsLoRA adapter.
SPECS = {
    "qv4": AdapterSpec(4, 8, ("q_proj", "v_proj")),
    "all8": AdapterSpec(8, 16, tuple(ALL), rslora=True),
    "mlp16": AdapterSpec(16, 16, ("o_proj", "gate_proj", "up_proj", "down_proj")),
    "kd64": AdapterSpec(64, 32, ("k_proj", "down_proj")),
}


def make_adapter(base: Path, folder: Path, spec: AdapterSpec, seed: int, **extra: object) -> Path:
    """A trained-looking adapter: `init_lora_weights=False` gives random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED + 1000 + seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                     use_rslora=spec.rslora, init_lora_weights=False, lora_dropout=0.0, **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # large enough deltas that every adapter changes the greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(folder)
    return folder


def peft_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], max_new_tokens: int,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[list[int]]:
    """peft's greedy generate with one adapter alone (None: the base model), one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, torch_dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs
