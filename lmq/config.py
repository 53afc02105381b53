"""Frozen configuration objects, validated at construction and passed down explicitly.

Profiled values (the KV block count) are computed and then a new config is built with
`dataclasses.replace`, never patched in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check(cond: bool, name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


VISION_TOWERS = ("clip", "siglip")


@dataclass(frozen=True)
class VisionConfig:
    """A LLaVA model's vision side, read from its config.json (`vision_config` and the LLaVA
    options): the ViT tower, which hidden states feed the projector, and the placeholder token."""

    tower: str  # "clip" (class token, pre-norm, quick_gelu) | "siglip" (no class token, gelu_tanh)
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]  # hidden_states indices (0 = embeddings), concatenated on the last dim
    select_strategy: str  # "default" drops the class token, "full" keeps every position
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    image_token_id: int
    # LLaVA-NeXT ("anyres"): the (height, width) resolutions an image may be tiled to, multiples of
    # image_size; empty for LLaVA (one tile per image)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        _check(self.tower in VISION_TOWERS, "vision tower", self.tower, f"one of {', '.join(VISION_TOWERS)}")
        _check(self.select_strategy in ("default", "full"), "vision_feature_select_strategy", self.select_strategy,
               "'default' or 'full'")
        _check(self.image_size % self.patch_size == 0, "image_size", self.image_size,
               f"a multiple of patch_size={self.patch_size}")
        for layer in self.feature_layers:
            _check(-(self.num_layers + 1) <= layer <= self.num_layers, "vision_feature_layer", layer,
                   f"a hidden-state index in [{-(self.num_layers + 1)}, {self.num_layers}]")
        if self.grid_pinpoints and self.tokens_per_tile != self.patches_per_tile:
            raise ValueError(f"vision_feature_select_strategy={self.select_strategy!r} with a {self.tower} tower "
                             "does not fit LLaVA-NeXT's tile grid: each tile's features must be its patches "
                             "('default' with CLIP, 'full' with SigLIP)")
        for h, w in self.grid_pinpoints:
            _check(h > 0 and w > 0 and h % self.image_size == 0 and w % self.image_size == 0,
                   "image_grid_pinpoints", [h, w], f"positive multiples of the tower's image_size={self.image_size}")

    @property
    def has_class_token(self) -> bool:
        return self.tower == "clip"

    @property
    def anyres(self) -> bool:
        return bool(self.grid_pinpoints)

    @property
    def patches_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """Features one tile gives: its patches and the class token, less the first position when
        the select strategy is "default" (transformers drops it whatever the tower: the class token
        of CLIP, a patch of SigLIP), as LlavaProcessor counts them. A LLaVA image is one tile."""
        return self.patches_per_tile + int(self.has_class_token) - int(self.select_strategy == "default")

    @property
    def num_layers_run(self) -> int:
        """Tower layers the deepest selected hidden state needs (LLaVA's usual -2 skips the last)."""
        return max(layer % (self.num_layers + 1) for layer in self.feature_layers)


@dataclass(frozen=True)
class QuantConfig:
    """A quantized checkpoint's `quantization_config`: AutoAWQ's GEMM format (4-bit weights in
    groups of `group_size` input channels, a zero point per group, float16 scales)."""

    method: str  # "awq"
    bits: int
    group_size: int
    zero_point: bool = True

    def __post_init__(self) -> None:
        _check(self.method == "awq", "quantization_config.quant_method", self.method, "'awq'")
        _check(self.bits == 4, "quantization_config.bits", self.bits, "4")
        _check(self.group_size > 0, "quantization_config.group_size", self.group_size,
               "> 0 (per-channel AWQ, group_size -1, is not supported)")
        _check(self.zero_point, "quantization_config.zero_point", self.zero_point, "true")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, read from an HF config.json."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # qkv bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    sliding_windows: tuple[int | None, ...]  # one per layer; None = full attention
    dtype: torch.dtype
    rope_inv_freq: tuple[float, ...]  # [head_dim / 2], float32 values from transformers' rope code
    rope_attention_scaling: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    vision: VisionConfig | None = None  # a vision-language (LLaVA) model: its tower and projector
    quant: QuantConfig | None = None  # AWQ checkpoints: the language model's linears are 4-bit

    def __post_init__(self) -> None:
        _check(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads", self.num_kv_heads,
               f"a divisor of num_attention_heads={self.num_heads}")
        _check(len(self.sliding_windows) == self.num_layers, "sliding_windows", len(self.sliding_windows),
               f"one entry per layer ({self.num_layers})")
        _check(self.max_model_len > 0, "max_model_len", self.max_model_len, "> 0")
        if self.quant is not None:
            g = self.quant.group_size
            for name, n in (("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size),
                            ("num_attention_heads * head_dim", self.num_heads * self.head_dim)):
                _check(n % g == 0, "quantization_config.group_size", g, f"a divisor of {name}={n}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, in the model dtype."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class CacheConfig:
    """Blocked KV cache. Exactly one of the three sizing knobs decides the block count:
    `num_kv_blocks` if given, else `gpu_memory_utilization` on CUDA, else `kv_cache_gb` on CPU."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_gb: float = 2.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", self.block_size,
               "a power of two from 1 to 128")
        if self.num_kv_blocks is not None:
            _check(self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, ">= 1")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               self.gpu_memory_utilization, "in (0, 1]")
        _check(self.kv_cache_gb > 0, "kv_cache_gb", self.kv_cache_gb, "> 0")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # per-step token budget; long prompts are chunked under it
    max_model_len: int = 8192
    # Schedule step n+1 while step n runs on the device (vLLM's --async-scheduling): its
    # sampled tokens feed step n+1 on the device, and the host learns them one step later.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA: `max_loras` device slots hold the adapters one step may use (the scheduler
    never mixes more); `max_cpu_loras` adapters stay loaded in host memory (LRU), the rest are
    read from disk again on demand."""

    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 32

    def __post_init__(self) -> None:
        _check(self.max_loras >= 1, "max_loras", self.max_loras, ">= 1")
        _check(self.max_lora_rank >= 1, "max_lora_rank", self.max_lora_rank, ">= 1")
        _check(self.max_cpu_loras >= self.max_loras, "max_cpu_loras", self.max_cpu_loras,
               f">= max_loras={self.max_loras}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig | None = None  # None: no adapters can be served
    backend: str = "pytorch"
    device: str = "cpu"
    enable_cuda_graph: bool = True  # decode steps on CUDA replay captured graphs
    seed: int = 0
    # Vision-language models: one encoder replica per device (empty: every visible GPU when
    # `device` is CUDA, else `device`), each encoding up to this many images at once.
    vision_devices: tuple[str, ...] = ()
    vision_max_batch_size: int = 16
    tokenizer: str | None = None  # a tokenizer folder other than the model's (None: the model folder)
    chat_template: str | None = None  # Jinja template text replacing the tokenizer's own
    trust_remote_code: bool = False  # passed to transformers when it reads the config and tokenizer

    def __post_init__(self) -> None:
        _check(self.backend in ("pytorch", "turbomind"), "backend", self.backend, "'pytorch' or 'turbomind'")
        # Positions past the model's rope table and graph buckets must never be scheduled.
        _check(self.scheduler.max_model_len <= self.model.max_model_len, "max_model_len",
               self.scheduler.max_model_len, f"<= the model's max_model_len={self.model.max_model_len}")
        _check(self.vision_max_batch_size >= 1, "vision_max_batch_size", self.vision_max_batch_size, ">= 1")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63, "seed",
               self.seed, "an integer in [0, 2^63)")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model.path

    def with_num_kv_blocks(self, num_blocks: int) -> EngineConfig:
        return dataclasses.replace(self, cache=dataclasses.replace(self.cache, num_kv_blocks=num_blocks))
