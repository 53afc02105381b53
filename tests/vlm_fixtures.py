"""Tiny random LLaVA and LLaVA-NeXT folders (CLIP or SigLIP tower over a tiny Llama) with a
tokenizer that knows `<image>`, the LLaVA chat template and the tower's image processor config,
built fresh per run."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import BASE, SEED, make_tokenizer

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's template (llava-hf): content parts of type "image" become <image>, text parts their text.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
TOWERS = {
    # 30 px / 6 px patches: 25 patches + a class token; LLaVA's default: hidden state -2, class token dropped
    "clip": dict(vision=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=72, num_hidden_layers=3,
                             num_attention_heads=4, image_size=30, patch_size=6, hidden_act="quick_gelu"),
                 llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default")),
    # 24 px / 4 px: 36 patches, no class token; two feature layers concatenated, every position kept
    "siglip": dict(vision=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=80,
                               num_hidden_layers=3, num_attention_heads=4, image_size=24, patch_size=4,
                               hidden_act="gelu_pytorch_tanh", vision_use_head=False),
                   llava=dict(vision_feature_layer=[-1, 1], vision_feature_select_strategy="full")),
}
# LLaVA-NeXT grids for the tiny towers: 1x2, 2x1, 2x2 and 1x3 tiles of the tower's image size
PINPOINTS = ((1, 2), (2, 1), (2, 2), (1, 3))


def image_token_id(folder: Path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(IMAGE_TOKEN)


def make_llava(folder: Path, tower: str = "clip", seed: int = 0, anyres: bool = False) -> Path:
    """A LlavaForConditionalGeneration folder (anyres: LlavaNextForConditionalGeneration) with
    random weights (initializer_range 0.1, so that greedy tokens depend on the image)."""
    import transformers
    from transformers import AutoTokenizer

    make_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = LLAVA_TEMPLATE
    tok.save_pretrained(folder)
    spec = TOWERS[tower]
    vcfg = transformers.AutoConfig.for_model(**spec["vision"], initializer_range=0.1)
    text = transformers.LlamaConfig(**{**BASE, "tie_word_embeddings": False})
    size = spec["vision"]["image_size"]
    pinpoints = [[r * size, c * size] for r, c in PINPOINTS]
    kind = "LlavaNext" if anyres else "Llava"
    config_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}ForConditionalGeneration")
    cfg = config_cls(vision_config=vcfg.to_dict(), text_config=text.to_dict(),
                     image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                     initializer_range=0.1, **spec["llava"], **({"image_grid_pinpoints": pinpoints} if anyres else {}))
    torch.manual_seed(SEED + 100 + seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # transformers' init leaves norms and biases at constants: randomize every tensor
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1 if p.dim() > 1 or "class_embedding" in name else 0.02)
    model.save_pretrained(folder)
    if anyres:
        proc = transformers.LlavaNextImageProcessor(size={"shortest_edge": size},
                                                    crop_size={"height": size, "width": size},
                                                    image_grid_pinpoints=pinpoints)
    elif tower == "clip":
        proc = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        proc = transformers.SiglipImageProcessor(size={"height": size, "width": size})
    proc.save_pretrained(folder)
    return folder


class HFLlava:
    """transformers' greedy generate, one prompt at a time, placeholders expanded as LlavaProcessor
    does (LLaVA-NeXT: by transformers' own LlavaNextProcessor, an independent count)."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.proc = AutoImageProcessor.from_pretrained(folder)
        self.anyres = AutoConfig.from_pretrained(folder).model_type == "llava_next"
        if self.anyres:
            from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

            model_cls = LlavaNextForConditionalGeneration
        else:
            model_cls = LlavaForConditionalGeneration
        self.model = model_cls.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.model.generation_config.eos_token_id = None
        self.dtype, self.device = dtype, device
        cfg = self.model.config
        clip = cfg.vision_config.model_type == "clip_vision_model"
        if self.anyres:
            self.processor = LlavaNextProcessor(
                image_processor=self.proc, tokenizer=self.tok, patch_size=cfg.vision_config.patch_size,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                num_additional_image_tokens=int(clip), image_token=IMAGE_TOKEN)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.per_image = side * side + int(clip and cfg.vision_feature_select_strategy == "full")

    def inputs(self, text: str, images: list) -> tuple[list[int], dict]:
        """The expanded prompt ids and the model's image inputs."""
        if self.anyres and images:
            out = self.processor(text=text, images=images, return_tensors="pt")
            kwargs = {"pixel_values": out["pixel_values"].to(self.device, self.dtype),
                      "image_sizes": out["image_sizes"].to(self.device)}
            return out["input_ids"][0].tolist(), kwargs
        token = self.model.config.image_token_id
        ids = []
        for t in self.tok.encode(text):
            ids += [t] * self.per_image if t == token else [t]
        if not images:
            return ids, {}
        pixels = self.proc(images=images, return_tensors="pt")["pixel_values"]
        return ids, {"pixel_values": pixels.to(self.device, self.dtype)}

    def fed_logprobs(self, text: str, images: list, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), V] float32 log-probabilities of the rows predicting `tokens` when they are
        fed after the prompt (teacher forcing): row i is the distribution `tokens[i]` was drawn from."""
        ids, kwargs = self.inputs(text, images)
        x = torch.tensor([ids + tokens], device=self.device)
        with torch.no_grad():
            logits = self.model(x, **kwargs).logits[0, len(ids) - 1:-1]
        return logits.float().log_softmax(-1)

    def greedy(self, text: str, images: list, max_new: int, gaps: list[float] | None = None) -> list[int]:
        """Greedy tokens; `gaps` (if given) receives the top-2 logit gap of every step."""
        ids, kwargs = self.inputs(text, images)
        x = torch.tensor([ids], device=self.device)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                                  pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs)
        if gaps is not None:
            top2 = [sc[0].float().topk(2).values for sc in out.scores]
            gaps.extend((t[0] - t[1]).item() for t in top2)
        return out.sequences[0, len(ids):].tolist()
