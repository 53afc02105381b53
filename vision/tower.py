"""Vision towers built with timm, with weights mapped from HF CLIP / SigLIP checkpoint names.

    HF CLIPVisionModel / SiglipVisionModel          timm VisionTransformer
    embeddings.class_embedding        [D]      ->   cls_token        [1, 1, D]   (CLIP only)
    embeddings.patch_embedding.*               ->   patch_embed.proj.*           (bias: SigLIP only)
    embeddings.position_embedding.weight [P, D] ->  pos_embed        [1, P, D]
    pre_layrnorm.*                             ->   norm_pre.*                   (CLIP only)
    encoder.layers.i.layer_norm{1,2}.*         ->   blocks.i.norm{1,2}.*
    encoder.layers.i.self_attn.{q,k,v}_proj.*  ->   blocks.i.attn.qkv.*          (q | k | v rows)
    encoder.layers.i.self_attn.out_proj.*      ->   blocks.i.attn.proj.*
    encoder.layers.i.mlp.fc{1,2}.*             ->   blocks.i.mlp.fc{1,2}.*
    post_layernorm, SigLIP's pooling head      ->   not built: LLaVA reads hidden states before them

Only the blocks up to the deepest selected hidden state are built (LLaVA's usual
`vision_feature_layer=-2` never runs the last one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from lmq.config import VisionConfig
from vision.torchvision_shim import ensure_torchvision

# HF activation names -> timm's
_ACTS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_new": "gelu_tanh"}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_BLOCK_PARTS = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def build_tower(cfg: VisionConfig) -> nn.Module:
    """A timm VisionTransformer shaped like the checkpoint's tower (random weights until loaded)."""
    ensure_torchvision()
    from timm.models.vision_transformer import VisionTransformer

    if cfg.hidden_act not in _ACTS:
        raise ValueError(f"vision hidden_act={cfg.hidden_act!r} is not supported: supported are {', '.join(_ACTS)}")
    clip = cfg.tower == "clip"
    # timm sizes the MLP as int(dim * mlp_ratio); half a unit over keeps float rounding from losing one
    mlp_ratio = (cfg.intermediate_size + 0.5) / cfg.hidden_size
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=3, num_classes=0, global_pool="",
        embed_dim=cfg.hidden_size, depth=cfg.num_layers_run, num_heads=cfg.num_heads, mlp_ratio=mlp_ratio,
        qkv_bias=True, class_token=clip, no_embed_class=False, pre_norm=clip, final_norm=False, fc_norm=False,
        act_layer=_ACTS[cfg.hidden_act], norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))


def tower_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, layers: tuple[int, ...],
                        num_layers: int) -> list[torch.Tensor]:
    """pixel_values: [N, 3, H, W] -> the hidden states at `layers` ([N, tokens, D] each), indexed as
    transformers' `hidden_states` (0 = the embeddings after the pre-norm, i = block i's output)."""
    wanted = [layer % (num_layers + 1) for layer in layers]
    x = tower.norm_pre(tower._pos_embed(tower.patch_embed(pixel_values)))  # [N, tokens, D]
    states = {0: x}
    for i, block in enumerate(tower.blocks[:max(wanted)], start=1):
        x = block(x)
        states[i] = x
    return [states[i] for i in wanted]


def load_tower_weights(tower: nn.Module, cfg: VisionConfig, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """HF tower names (inside `vision_model.`) -> the timm tower; every built parameter must be covered."""
    params = dict(tower.named_parameters())
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> {q, k, v}
    filled: set[str] = set()

    def put(name: str, tensor: torch.Tensor) -> None:
        dst = params[name]
        if dst.numel() != tensor.numel():
            raise ValueError(f"vision weight for {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(tensor.reshape(dst.shape))
        filled.add(name)

    for name, tensor in weights:
        target = _timm_name(name, cfg)
        if target is None:
            continue
        if target.startswith("qkv:"):
            _, block, proj, kind = target.split(":")
            qkv.setdefault((int(block), kind), {})[proj] = tensor
            continue
        put(target, tensor)
    for (block, kind), parts in qkv.items():
        put(f"blocks.{block}.attn.qkv.{kind}", torch.cat([parts["q"], parts["k"], parts["v"]]))
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"the checkpoint's vision tower is missing weights for: {', '.join(missing[:8])}")


def _timm_name(name: str, cfg: VisionConfig) -> str | None:
    """The timm parameter an HF tower tensor goes to; "qkv:<block>:<q|k|v>:<kind>" for the parts
    of a fused projection; None for what the tower does not build."""
    direct = {"embeddings.class_embedding": "cls_token", "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
              "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
              "embeddings.position_embedding.weight": "pos_embed",
              "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias"}
    if name in direct:
        return direct[name]
    m = _LAYER.fullmatch(name)
    if m is None:
        return None  # post_layernorm, head.*, embeddings.position_ids
    block, rest = int(m.group(1)), m.group(2)
    if block >= cfg.num_layers_run:
        return None
    module, kind = rest.rsplit(".", 1)
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"qkv:{block}:{module[len('self_attn.')]}:{kind}"
    if module in _BLOCK_PARTS:
        return f"blocks.{block}.{_BLOCK_PARTS[module]}.{kind}"
    raise ValueError(f"unexpected vision tower weight {name!r}")
