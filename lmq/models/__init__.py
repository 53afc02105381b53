"""Architecture registry: HF `architectures[0]` -> model class, and ModelConfig from config.json."""

from __future__ import annotations

import torch

from lmq.config import SUPPORTED_DTYPES, ModelConfig, QuantConfig, VisionConfig
from lmq.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# a vision tower + projector over one of ARCHITECTURES (LLaVA-NeXT: images tiled at any resolution)
VISION_LANGUAGE = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
_TEXT_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}
_VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


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


def vision_config_from_hf(path: str, hf_config: object) -> VisionConfig:
    """A LLaVA or LLaVA-NeXT config.json's vision side."""
    v, t = hf_config.vision_config, hf_config.text_config
    tower = _VISION_MODEL_TYPES.get(v.model_type)
    if tower is None:
        raise ValueError(f"vision tower model_type={v.model_type!r} in {path}/config.json is not supported: "
                         f"supported are {', '.join(_VISION_MODEL_TYPES)}")
    layer = hf_config.vision_feature_layer
    return VisionConfig(
        tower=tower, image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
        feature_layers=(layer,) if isinstance(layer, int) else tuple(layer),
        select_strategy=hf_config.vision_feature_select_strategy, projector_act=hf_config.projector_hidden_act,
        projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)), text_hidden_size=t.hidden_size,
        image_token_id=hf_config.image_token_id,
        grid_pinpoints=tuple(tuple(p) for p in getattr(hf_config, "image_grid_pinpoints", None) or ()))


def quant_config_from_hf(path: str, hf_config: object) -> QuantConfig | None:
    """An AWQ checkpoint's quantization_config (AutoAWQ's GEMM version); None for a plain one."""
    q = getattr(hf_config, "quantization_config", None)
    if not q:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method")
    if method != "awq":
        raise ValueError(f"{path}/config.json: quantization_config.quant_method={method!r} is not supported: "
                         "lmq loads AWQ checkpoints ('awq')")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{path}/config.json: AWQ version={version!r} is not supported: only 'gemm'")
    skipped = q.get("modules_to_not_convert") or []
    if any(not m.startswith(("vision_tower", "multi_modal_projector", "lm_head")) for m in skipped):
        raise ValueError(f"{path}/config.json: modules_to_not_convert={skipped} leaves language-model linears "
                         "unquantized, which lmq does not support")
    bits, group = q.get("bits", q.get("w_bit", 4)), q.get("group_size", q.get("q_group_size", 128))
    return QuantConfig("awq", int(bits), int(group), bool(q.get("zero_point", True)))


def _text_config(path: str, hf_config: object) -> tuple[str, object, VisionConfig | None]:
    """(language-model architecture, its config, the vision side or None) of any supported folder."""
    archs = getattr(hf_config, "architectures", None) or []
    arch = archs[0] if archs else f"<none; model_type={getattr(hf_config, 'model_type', None)!r}>"
    if arch in VISION_LANGUAGE:
        text = hf_config.text_config
        text_arch = _TEXT_MODEL_TYPES.get(text.model_type)
        if text_arch is None:
            raise ValueError(f"language model model_type={text.model_type!r} of {arch} in {path}/config.json is "
                             f"not supported: supported are {', '.join(_TEXT_MODEL_TYPES)}")
        return text_arch, text, vision_config_from_hf(path, hf_config)
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} in {path}/config.json is not supported: "
                         f"supported are {', '.join([*ARCHITECTURES, *VISION_LANGUAGE])}")
    return arch, hf_config, None


def model_config_from_hf(path: str, hf_config: object, dtype: str | torch.dtype, device: str,
                         max_model_len: int | None = None, generation_eos: object = None) -> ModelConfig:
    outer = hf_config
    arch, c, vision = _text_config(path, hf_config)
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
        dtype=resolve_dtype(dtype, outer, device),
        rope_inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        eos_token_ids=_eos_ids(c, generation_eos),
        vision=vision,
        quant=quant_config_from_hf(path, outer),
    )
