"""AutoAWQ's own code as the reference for the checkpoint format, and dense HF folders made
from AWQ checkpoints (the weights unpacked by AutoAWQ's functions, dequantized exactly in
float32) for transformers and peft to run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import torch

PACKED = (".qweight", ".qzeros", ".scales")


def autoawq(module: str) -> types.ModuleType:
    """A module of the installed autoawq package (`make setup` installs it with --no-deps),
    imported without running `awq/__init__.py`, which needs transformers 4 and its own deps."""
    if "awq" not in sys.modules:
        spec = importlib.util.find_spec("awq")
        assert spec is not None and spec.submodule_search_locations, "autoawq is not installed (make setup)"
        package = types.ModuleType("awq")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["awq"] = package
    return importlib.import_module(module)


def autoawq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """W [out, in] float32 from AutoAWQ's GEMM tensors, unpacked by AutoAWQ's packing_utils.
    (Its dequantize_gemm multiplies in float16; here the product is exact.)"""
    pu = autoawq("awq.utils.packing_utils")
    iw, iz = pu.unpack_awq(qweight, qzeros, 4)
    iw, iz = pu.reverse_awq_order(iw, iz, 4)
    iw, iz = iw & 0xF, iz & 0xF  # [in, out], [in / g, out]
    w = (iw - iz.repeat_interleave(group_size, dim=0)).float() * scales.float().repeat_interleave(group_size, dim=0)
    return w.t().contiguous()


def dense_folder(awq_dir: Path, base_dir: Path, out: Path) -> Path:
    """An fp32 HF folder with the AWQ checkpoint's weights dequantized, in base_dir's architecture."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(awq_dir / "model.safetensors"))
    group = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    group_size = group.get("group_size", group.get("q_group_size"))
    state = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            p = name.removesuffix(".qweight")
            state[f"{p}.weight"] = autoawq_unpack(t, tensors[f"{p}.qzeros"], tensors[f"{p}.scales"], group_size)
        elif not name.endswith(PACKED):
            state[name] = t.float()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model.config.tie_word_embeddings
    assert not unexpected and missing == (["lm_head.weight"] if tied else []), (missing, unexpected)
    if tied:
        model.tie_weights()
    model.save_pretrained(out)
    for f in awq_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return out
