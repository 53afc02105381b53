"""VisionEncoder: a LLaVA model's tower + feature selection + projector, image -> LM embeddings.

    pixel_values [N, 3, S, S] -> tower hidden states at `feature_layers` ([N, 1 + P, Dv] each,
    without the class token for SigLIP) -> drop the class token ("default") -> concatenate on the
    last dim [N, tokens, Dv * layers] -> projector (linear, act, linear) -> [N, tokens, D_text]

as transformers' `LlavaModel.get_image_features` computes it.
"""

from __future__ import annotations

import torch
from torch import nn

from lmq.config import ModelConfig, VisionConfig
from lmq.weights import part_weights
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

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [N, 3, S, S] (any dtype) -> [N, tokens_per_image, text_hidden] in the encoder's dtype."""
        cfg = self.cfg
        dtype = self.projector.linear_1.weight.dtype
        states = tower_hidden_states(self.tower, pixel_values.to(dtype), cfg.feature_layers, cfg.num_layers)
        if cfg.has_class_token and cfg.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.projector(torch.cat(states, dim=-1))


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
    return enc.to(model.dtype).eval()
