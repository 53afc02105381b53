"""vision.encoder: timm towers with HF weights + feature selection + projector, against
transformers' LlavaModel.get_image_features on fresh random pixels (float32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig

from conftest import SEED
from lmq.config import VisionConfig
from lmq.models import model_config_from_hf
from lmq.weights import llava_part
from vision.encoder import load_encoder
from vlm_fixtures import TOWERS, make_llava


@pytest.fixture(scope="module")
def llava_folders(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("llava-enc")
    return {t: make_llava(root / t, t, seed=i) for i, t in enumerate(TOWERS)}


@pytest.mark.parametrize("tower", list(TOWERS))
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_image_features_match_transformers(llava_folders, tower, strategy):
    from transformers import LlavaForConditionalGeneration

    folder = llava_folders[tower]
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model_config_from_hf(str(folder), AutoConfig.from_pretrained(folder), "float32", "cpu")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, select_strategy=strategy))
    enc = load_encoder(cfg, "cpu")
    size = cfg.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        ref = torch.stack(list(hf.model.get_image_features(
            pixels, vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=strategy).pooler_output))
    ours = enc(pixels)
    assert ours.shape == ref.shape == (3, cfg.vision.tokens_per_tile, cfg.hidden_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # The tower builds only the blocks the deepest selected state needs.
    assert len(enc.tower.blocks) == cfg.vision.num_layers_run <= cfg.vision.num_layers


def test_tokens_per_tile_and_layers_run():
    base = dict(image_size=336, patch_size=14, hidden_size=8, intermediate_size=8, num_layers=24, num_heads=2,
                layer_norm_eps=1e-5, hidden_act="quick_gelu", projector_act="gelu", projector_bias=True,
                text_hidden_size=8, image_token_id=5)
    llava15 = VisionConfig(tower="clip", feature_layers=(-2,), select_strategy="default", **base)
    assert (llava15.tokens_per_tile, llava15.num_layers_run) == (576, 23)
    full = VisionConfig(tower="clip", feature_layers=(-1, 4), select_strategy="full", **base)
    assert (full.tokens_per_tile, full.num_layers_run) == (577, 24)
    # "default" drops the first position whatever the tower: a SigLIP patch too, as transformers does
    siglip = VisionConfig(tower="siglip", feature_layers=(-1,), select_strategy="default", **base)
    assert siglip.tokens_per_tile == 575
    with pytest.raises(ValueError, match="does not fit LLaVA-NeXT's tile grid"):
        VisionConfig(tower="clip", feature_layers=(-2,), select_strategy="full", grid_pinpoints=((336, 672),), **base)
    with pytest.raises(ValueError, match=r"image_grid_pinpoints=\[336, 600\] is invalid"):
        VisionConfig(tower="clip", feature_layers=(-2,), select_strategy="default", grid_pinpoints=((336, 600),),
                     **base)
    with pytest.raises(ValueError, match="vision_feature_layer=-26 is invalid"):
        VisionConfig(tower="clip", feature_layers=(-26,), select_strategy="default", **base)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='cls'"):
        VisionConfig(tower="clip", feature_layers=(-2,), select_strategy="cls", **base)


@pytest.mark.parametrize("name, part, inner", [
    ("language_model.model.layers.0.mlp.up_proj.weight", "language_model", "model.layers.0.mlp.up_proj.weight"),
    ("model.language_model.embed_tokens.weight", "language_model", "model.embed_tokens.weight"),
    ("language_model.lm_head.weight", "language_model", "lm_head.weight"),
    ("lm_head.weight", "language_model", "lm_head.weight"),
    ("vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias", "vision_tower", "encoder.layers.3.mlp.fc1.bias"),
    ("model.vision_tower.embeddings.class_embedding", "vision_tower", "embeddings.class_embedding"),
    ("multi_modal_projector.linear_1.weight", "multi_modal_projector", "linear_1.weight"),
])
def test_llava_checkpoint_names_of_every_transformers_version(name, part, inner):
    assert llava_part(name) == (part, inner)
