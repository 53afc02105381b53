"""VisionEncoder: a LLaVA model's tower + feature selection + projector, image -> LM embeddings.

    pixel_values [N, 3, S, S] (N tiles) -> tower hidden states at `feature_layers` ([N, 1 + P, Dv]
    each, without the class token for SigLIP) -> "default" drops the first position ->
    concatenate on the last dim [N, tokens, Dv * layers] -> projector (linear, act, linear)
    -> [N, tokens, D_text]; LLaVA-NeXT then packs each image's tiles (vision.anyres)

as transformers' `LlavaModel.get_image_features` and `LlavaNextModel.get_image_features` compute it.
"""

from __future__ import annotations

import torch
from torch import nn

from lmq.config import ModelConfig, VisionConfig
from lmq.multimodal import ProcessedImage
from lmq.weights import part_weights
from vision import anyres
from vision.tower import build_tower, load_tower_weights, tower_hidden_states


class Projector(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        from transformers.activations import ACT2FN  # the same activation objects transformers uses

        super().__init__()
        d_in = cfg.hidden_size * len(cfg.feature_layers)
        self.linear_1 = nn.Linear(d_in, cfg.text_hidden_size, bias=cfg.projector_bias)
        self.act = ACT2FN[cfg.projector_act]
        self.linear_2 = nn.Linear(cfg.text_hidden_size, cfg.text_hidden_size, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = build_tower(cfg)
        self.projector = Projector(cfg)
        # LLaVA-NeXT: the embedding written after every row of an image's tile grid
        self.image_newline = nn.Parameter(torch.zeros(cfg.text_hidden_size)) if cfg.anyres else None

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [N, 3, S, S] tiles (any dtype) -> [N, tokens_per_tile, text_hidden] in the encoder's dtype."""
        cfg = self.cfg
        dtype = self.projector.linear_1.weight.dtype
        states = tower_hidden_states(self.tower, pixel_values.to(dtype), cfg.feature_layers, cfg.num_layers)
        if cfg.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.projector(torch.cat(states, dim=-1))

    @torch.inference_mode()
    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Images (on any device) -> each image's features [num_tokens, text_hidden] on the
        encoder's device: every tile of every image in one tower batch."""
        device = self.projector.linear_1.weight.device
        # each image to the device, then concatenated there: no copy of the whole batch on the host
        pixels = torch.cat([im.pixel_values.to(device, non_blocking=True) for im in images])
        feats = self(pixels).split([im.pixel_values.shape[0] for im in images])  # [T_i, tokens_per_tile, D] each
        if not self.cfg.anyres:
            return [f[0] for f in feats]
        return [anyres.pack(self.cfg, f, im.image_size, self.image_newline) for f, im in zip(feats, images)]


def load_encoder(model: ModelConfig, device: str | torch.device) -> VisionEncoder:
    """The checkpoint's tower and projector on `device`, in the model's dtype."""
    if model.vision is None:
        raise ValueError(f"{model.path} is not a vision-language model")
    with torch.device(device):
        enc = VisionEncoder(model.vision)
    load_tower_weights(enc.tower, model.vision, part_weights(model.path, "vision_tower"))
    proj = dict(part_weights(model.path, "multi_modal_projector"))
    try:
        enc.projector.load_state_dict(proj)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's projector weights do not fit its config: {e}") from None
    if enc.image_newline is not None:
        newline = dict(part_weights(model.path, "image_newline")).get("image_newline")
        if newline is None or newline.shape != enc.image_newline.shape:
            raise ValueError(f"{model.path} is a LLaVA-NeXT model without an image_newline weight of shape "
                             f"({model.vision.text_hidden_size},)")
        with torch.no_grad():
            enc.image_newline.copy_(newline)
    return enc.to(model.dtype).eval()
