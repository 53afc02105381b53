"""The Llama family: Llama (GQA, tied or untied embeddings, llama3 rope), Mistral (sliding
window), Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm). Written against the ops interface:
`ops` is torch_engine.ops or turbomind.ops, and this file never knows which.

Projections are fused: q|k|v in one matrix, gate|up in another (HF checkpoints are split;
`load_weights` copies each part into its slice: rows of a dense weight, columns of AWQ's packed
[in, out / 8] tensors). With LoRA enabled, each projection also holds a `LoRAStack` of every
slot's adapter weights, laid out by the same parts.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lmq.config import LoRAConfig, ModelConfig, QuantConfig
from lmq.multimodal import ImageEmbeds
from lora.ops import LoRAMetadata, LoRAStack
from lora.slot_image import SlotImage, SlotLayout, SlotWriter


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """Uninitialized, on the current device context (`with torch.device(...)`), in an explicit
    dtype: building a model never reads or changes torch's default dtype."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


AWQ_TENSORS = ("qweight", "qzeros", "scales")


class Linear(nn.Module):
    def __init__(self, parts: list[int], in_features: int, dtype: torch.dtype, bias: bool = False,
                 quant: QuantConfig | None = None) -> None:
        """parts: output rows of each fused part (one entry for an unfused projection).
        quant: AWQ's 4-bit layout (quant_tools/awq_format.py) in place of a dense weight."""
        super().__init__()
        self.parts, self.in_features, self.quant = parts, in_features, quant
        out = sum(parts)
        if quant is None:
            self.weight = _param(out, in_features, dtype=dtype)
        else:
            groups = in_features // quant.group_size
            self.qweight = _param(in_features, out // 8, dtype=torch.int32)
            self.qzeros = _param(groups, out // 8, dtype=torch.int32)
            self.scales = _param(groups, out, dtype=dtype)
        self.bias = _param(out, dtype=dtype) if bias else None
        self.lora: LoRAStack | None = None

    def forward(self, ops: ModuleType, x: torch.Tensor, lora: LoRAMetadata | None) -> torch.Tensor:
        if self.quant is None:
            return ops.linear(x, self.weight, self.bias, self.lora, lora)
        return ops.awq_linear(x, self.qweight, self.qzeros, self.scales, self.quant.group_size, self.bias,
                              self.lora, lora)

    def pack_quantized(self, ops: ModuleType) -> None:
        """Once the checkpoint is in: the AWQ tensors in the layout the ops read (ops.awq_pack:
        AutoAWQ's own for torch_engine; for turbomind, the one its W4A16 kernels read)."""
        if self.quant is not None:
            packed = ops.awq_pack(self.qweight.data, self.qzeros.data, self.scales.data, self.quant.group_size)
            for name, t in zip(AWQ_TENSORS, packed):
                setattr(self, name, nn.Parameter(t, requires_grad=False))

    def part_index(self, kind: str, rows: slice | None) -> tuple[slice, ...] | None:
        """Where output rows `rows` of the fused matrix sit in its tensor `kind`."""
        if rows is None:
            return None
        if kind in ("weight", "bias"):
            return (rows,)
        per = 1 if kind == "scales" else 8  # qweight / qzeros: eight output columns per int32
        return (slice(None), slice(rows.start // per, rows.stop // per))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.window = cfg.sliding_windows[layer_idx]
        q, dt = cfg.quant, cfg.dtype
        self.qkv_proj = Linear([h * d, hkv * d, hkv * d], cfg.hidden_size, dt, bias=cfg.attention_bias, quant=q)
        self.o_proj = Linear([cfg.hidden_size], h * d, dt, quant=q)
        self.q_norm = _param(d, dtype=dt) if cfg.qk_norm else None
        self.k_norm = _param(d, dtype=dt) if cfg.qk_norm else None
        self.gate_up_proj = Linear([cfg.intermediate_size] * 2, cfg.hidden_size, dt, quant=q)
        self.down_proj = Linear([cfg.hidden_size], cfg.intermediate_size, dt, quant=q)
        self.input_layernorm = _param(cfg.hidden_size, dtype=dt)
        self.post_attention_layernorm = _param(cfg.hidden_size, dtype=dt)

    def forward(self, ops: ModuleType, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, cos_sin: torch.Tensor, meta: Any,
                lora: LoRAMetadata | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden]; kv_cache: [2, num_blocks, block_size, Hkv, D]; meta: the ops' own attention
        metadata (torch_engine.attention_metadata for torch_engine), with the step's slot_mapping."""
        cfg = self.cfg
        h, hkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        x, residual = ops.rms_norm(x, self.input_layernorm, eps, residual)
        qkv = self.qkv_proj(ops, x, lora)  # [T, (H + 2 Hkv) D]
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(-1, h, d), k.view(-1, hkv, d), v.view(-1, hkv, d)
        if self.q_norm is not None:
            q, _ = ops.rms_norm(q, self.q_norm, eps)
            k, _ = ops.rms_norm(k, self.k_norm, eps)
        q = ops.rotary_write_kv(positions, q, k, v, cos_sin, kv_cache[0], kv_cache[1], meta.slot_mapping)
        o = ops.attention(q, kv_cache[0], kv_cache[1], meta, d ** -0.5, self.window)  # [T, H, D]
        x = self.o_proj(ops, o.reshape(-1, h * d), lora)
        x, residual = ops.rms_norm(x, self.post_attention_layernorm, eps, residual)
        x = ops.silu_and_mul(self.gate_up_proj(ops, x, lora))
        return self.down_proj(ops, x, lora), residual

    def projections(self) -> dict[str, Linear]:
        return {"qkv_proj": self.qkv_proj, "o_proj": self.o_proj, "gate_up_proj": self.gate_up_proj,
                "down_proj": self.down_proj}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType) -> None:
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = _param(cfg.hidden_size, dtype=cfg.dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype)
        # [max_len, 2, D]: computed in float32, then cast to the model dtype (as transformers casts cos/sin)
        self.register_buffer("cos_sin", _rope_cache(cfg).to(cfg.dtype), persistent=False)
        self.lora_writer: SlotWriter | None = None  # enable_lora()

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: Any, lora: LoRAMetadata | None = None,
                images: ImageEmbeds | None = None) -> torch.Tensor:
        """token_ids, positions: [T]; kv_caches: [L, 2, num_blocks, block_size, Hkv, D] -> [T, hidden].
        images: features that replace the embeddings of image placeholder rows."""
        ops = self.ops
        x, residual = ops.embedding(token_ids, self.embed_tokens), None
        if images is not None:
            x = x.index_copy(0, images.rows, images.embeds.to(x.dtype))
        for i, layer in enumerate(self.layers):
            x, residual = layer(ops, positions, x, residual, kv_caches[i], self.cos_sin, meta, lora)
        x, _ = ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> [N, vocab] float32"""
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return self.ops.linear(hidden, w).float()

    # -- LoRA ----------------------------------------------------------------------------------
    def enable_lora(self, config: LoRAConfig) -> None:
        """Allocate every projection's slot stacks (zeros: an empty slot adds nothing) and the
        staging buffer slot loads go through (lora/slot_image.py)."""
        w = self.embed_tokens
        stacks = []
        for layer in self.layers:
            for lin in layer.projections().values():  # layer order, then SlotLayout's FUSED order
                lin.lora = LoRAStack(lin.parts, lin.in_features, config.max_lora_rank, config.max_loras,
                                     w.dtype, w.device)
                stacks.append(lin.lora)
        self.lora_writer = SlotWriter(SlotLayout.for_model(self.cfg), stacks, config.max_lora_rank)

    def load_lora_slot(self, slot: int, image: SlotImage | None) -> None:
        """Write a packed adapter into `slot` of every stack (None: empty the slot)."""
        assert self.lora_writer is not None, "load_lora_slot() before enable_lora()"
        self.lora_writer.write(slot, image)

    # -- weights -------------------------------------------------------------------------------
    def _targets(self, name: str) -> tuple[torch.Tensor, tuple[slice, ...] | None] | None:
        """HF parameter name -> (our tensor, where the part sits in it, or None for all of it)."""
        cfg = self.cfg
        qd, kvd, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            return self.embed_tokens, None
        if name == "norm.weight":
            return self.norm, None
        if name == "lm_head.weight":
            return (self.lm_head, None) if self.lm_head is not None else None
        parts = name.split(".")
        if parts[0] != "layers":
            raise ValueError(f"unexpected weight {name!r}")
        layer, rest = self.layers[int(parts[1])], ".".join(parts[2:])
        fused = {
            "self_attn.q_proj": (layer.qkv_proj, slice(0, qd)),
            "self_attn.k_proj": (layer.qkv_proj, slice(qd, qd + kvd)),
            "self_attn.v_proj": (layer.qkv_proj, slice(qd + kvd, qd + 2 * kvd)),
            "self_attn.o_proj": (layer.o_proj, None),
            "mlp.gate_proj": (layer.gate_up_proj, slice(0, inter)),
            "mlp.up_proj": (layer.gate_up_proj, slice(inter, 2 * inter)),
            "mlp.down_proj": (layer.down_proj, None),
        }
        plain = {
            "input_layernorm.weight": layer.input_layernorm,
            "post_attention_layernorm.weight": layer.post_attention_layernorm,
            "self_attn.q_norm.weight": layer.q_norm,
            "self_attn.k_norm.weight": layer.k_norm,
        }
        if rest in plain and plain[rest] is not None:
            return plain[rest], None
        module, kind = rest.rsplit(".", 1)
        if module in fused and kind in ("weight", "bias", *AWQ_TENSORS):
            lin, rows = fused[module]
            target = getattr(lin, kind, None)
            if target is not None:
                return target, lin.part_index(kind, rows)
        raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters; every parameter must be covered."""
        filled: dict[int, int] = {}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            target = self._targets(name)
            if target is None:
                continue
            param, index = target
            dst = param.data if index is None else param.data[index]
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            filled[id(param)] = filled.get(id(param), 0) + tensor.numel()
        missing = [n for n, p in self.named_parameters() if filled.get(id(p), 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        for layer in self.layers:
            for lin in layer.projections().values():
                lin.pack_quantized(self.ops)


def _rope_cache(cfg: ModelConfig) -> torch.Tensor:
    """cos/sin per position, computed in float32 exactly as transformers does: [max_len, 2, D]."""
    inv_freq = torch.tensor(cfg.rope_inv_freq, dtype=torch.float32)  # [D / 2]
    freqs = torch.arange(cfg.max_model_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1) * cfg.rope_attention_scaling
