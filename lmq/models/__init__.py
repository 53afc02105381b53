"""Architecture registry: HF `architectures[0]` -> model class, and ModelConfig from config.json."""

from __future__ import annotations

import torch

from lmq.config import SUPPORTED_DTYPES, ModelConfig
from lmq.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def resolve_dtype(dtype: str | torch.dtype, hf_config: object, device: str) -> torch.dtype:
    """`auto` follows the checkpoint's dtype on a GPU (bfloat16 when it names none) and is
    float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = SUPPORTED_DTYPES.get(cfg_dtype)
        return cfg_dtype if cfg_dtype in SUPPORTED_DTYPES.values() else torch.bfloat16
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: must be 'auto' or one of {sorted(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[dtype]


def _rope(hf_config: object, head_dim: int) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies from transformers' own rope functions, so scaling variants match it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported: supported are {', '.join(_ROPE_TYPES)}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return tuple(inv.tolist()), 1.0
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return tuple(inv.float().tolist()), float(scaling)


def _sliding_windows(hf_config: object, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * num_layers


def _eos_ids(hf_config: object, generation_eos: object) -> tuple[int, ...]:
    ids: list[int] = []
    for v in (getattr(hf_config, "eos_token_id", None), generation_eos):
        if isinstance(v, int):
            ids.append(v)
        elif isinstance(v, (list, tuple)):
            ids.extend(int(x) for x in v)
    return tuple(dict.fromkeys(ids))


def model_config_from_hf(path: str, hf_config: object, dtype: str | torch.dtype, device: str,
                         max_model_len: int | None = None, generation_eos: object = None) -> ModelConfig:
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else f"<none; model_type={getattr(hf_config, 'model_type', None)!r}>"
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} in {path}/config.json is not supported: "
                         f"supported are {', '.join(ARCHITECTURES)}")
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inv_freq, scaling = _rope(c, head_dim)
    limit = c.max_position_embeddings
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
    return ModelConfig(
        path=path,
        architecture=arch,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        max_model_len=max_model_len or limit,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(c, "attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_windows=_sliding_windows(c, c.num_hidden_layers),
        dtype=resolve_dtype(dtype, c, device),
        rope_inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        eos_token_ids=_eos_ids(c, generation_eos),
    )
