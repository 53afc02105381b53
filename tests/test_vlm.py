"""LLaVA end to end on the CPU: greedy tokens identical to transformers'
LlavaForConditionalGeneration (float32) for CLIP and SigLIP towers, one and several images per
prompt, odd image sizes, mixed with text-only requests, chunked prefill cutting through images;
prefix caching keyed on image content; the offline chat API with data URLs; failures that free
everything."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SEED, make_model
from lmq import LLM, SamplingParams
from vlm_fixtures import TOWERS, make_llava

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("llava")
    return {t: make_llava(root / t, t, seed=i) for i, t in enumerate(TOWERS)}


def random_images(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(SEED + seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class HFLlava:
    """transformers' greedy generate, one prompt at a time, placeholders expanded as LlavaProcessor does."""

    def __init__(self, folder) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.proc = AutoImageProcessor.from_pretrained(folder)
        self.model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        cls = cfg.vision_config.model_type == "clip_vision_model" and cfg.vision_feature_select_strategy == "full"
        self.per_image = side * side + int(cls)

    def greedy(self, text: str, images: list[Image.Image]) -> list[int]:
        token = self.model.config.image_token_id
        ids = []
        for t in self.tok.encode(text):
            ids += [t] * self.per_image if t == token else [t]
        kwargs = {"pixel_values": self.proc(images=images, return_tensors="pt")["pixel_values"]} if images else {}
        x = torch.tensor([ids])
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                                  pad_token_id=0, **kwargs)
        return out[0, len(ids):].tolist()


CASES = [  # (prompt, image sizes (w, h)); odd sizes, wide and tall, one or several per prompt
    ("USER: <image>\nWhat is this? ASSISTANT:", [(41, 17)]),
    ("USER: <image>\n<image>\nCompare the two. ASSISTANT:", [(23, 50), (64, 64)]),
    ("USER: Hello there, what is the capital of France? ASSISTANT:", []),
    ("<image>", [(7, 9)]),  # the prompt is only the image: its last position samples the first token
    ("USER: <image> one <image> two <image> three ASSISTANT:", [(33, 31), (12, 80), (90, 11)]),
]


def _prompts(seed: int) -> list[tuple[str, list[Image.Image]]]:
    return [(text, random_images(sizes, seed + i)) for i, (text, sizes) in enumerate(CASES)]


def _gen(llm: LLM, cases: list[tuple[str, list[Image.Image]]]) -> list[list[int]]:
    prompts = [{"prompt": t, "multi_modal_data": {"image": ims}} if ims else t for t, ims in cases]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("tower", list(TOWERS))
def test_greedy_matches_transformers_batched_with_text_and_chunked_through_images(llava, tower):
    cases = _prompts(seed=10)
    hf = HFLlava(llava[tower])
    ref = [hf.greedy(t, ims) for t, ims in cases]
    # One batch mixing image and text-only prompts; then a 16-token budget, so prefill chunks end
    # inside images (25 or 36 positions each) and several prompts share steps.
    for budget in (2048, 16):
        llm = LLM(str(llava[tower]), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=budget)
        assert _gen(llm, cases) == ref, f"budget {budget}"
    # The images matter: other pixels change what the model says.
    other = [(t, random_images([im.size for im in ims], seed=99 + i)) for i, (t, ims) in enumerate(cases)]
    assert [hf.greedy(t, ims) for t, ims in other if ims] != [r for r, (_, ims) in zip(ref, cases) if ims]


def test_prefix_cache_keys_on_image_content(llava):
    llm = LLM(str(llava["clip"]), dtype="float32", num_kv_blocks=256, block_size=4)
    text = "USER: describe <image>\nin one long sentence please, with many words ASSISTANT:"
    a, b = random_images([(30, 30)], seed=1), random_images([(30, 30)], seed=2)
    offset = llm.tokenizer.encode(text).index(llm.engine.config.model.vision.image_token_id)
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": a}}, GREEDY)[0]
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": a}}, GREEDY)[0]
    other = llm.generate({"prompt": text, "multi_modal_data": {"image": b}}, GREEDY)[0]
    n_prompt = len(first.prompt_token_ids)
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (n_prompt - 1) // 4 * 4 > offset + 25  # past the image
    assert other.num_cached_tokens == offset // 4 * 4  # the text before the image only
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_chat_with_data_urls_and_pil_parts_equals_generate(llava):
    llm = LLM(str(llava["siglip"]), dtype="float32", num_kv_blocks=256)
    ims = random_images([(50, 20), (20, 50)], seed=5)
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(ims[0])}},
        {"type": "text", "text": "What is in"},
        {"type": "image_pil", "image_pil": ims[1]},
        {"type": "text", "text": " these?"}]}]
    chat = llm.chat(msgs, GREEDY)[0]
    prompt = llm.tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in"}, {"type": "image"},
                                      {"type": "text", "text": " these?"}]}], tokenize=False,
        add_generation_prompt=True)
    gen = llm.generate({"prompt": prompt, "multi_modal_data": {"image": ims}}, GREEDY)[0]
    assert chat.prompt_token_ids == gen.prompt_token_ids
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids == HFLlava(llava["siglip"]).greedy(prompt, ims)


def test_bad_image_inputs_say_what_is_wrong(llava, tmp_path):
    llm = LLM(str(llava["clip"]), dtype="float32", num_kv_blocks=64)
    im = random_images([(10, 10)], seed=0)
    with pytest.raises(ValueError, match=r"2 image placeholder tokens .* but 1 images were given"):
        llm.generate({"prompt": "<image> and <image>", "multi_modal_data": {"image": im}}, GREEDY)
    with pytest.raises(ValueError, match=r"multi_modal_data\['image'\]\[0\] is a str"):
        llm.generate({"prompt": "<image>", "multi_modal_data": {"image": ["cat.png"]}}, GREEDY)
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: local image files are not allowed"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "/etc/passwd"}]}], GREEDY)
    assert not llm.engine.has_unfinished()
    text = LLM(str(make_model(tmp_path / "text", "llama")), dtype="float32", num_kv_blocks=64)
    with pytest.raises(ValueError, match="does not accept images"):
        text.generate({"prompt": "hi", "multi_modal_data": {"image": im}}, GREEDY)
    with pytest.raises(ValueError, match="does not accept images"):
        text.chat([{"role": "user", "content": [{"type": "image_url", "image_url": data_url(im[0])}]}], GREEDY)


def test_a_failing_encoder_fails_its_request_and_frees_everything(llava, monkeypatch):
    llm = LLM(str(llava["clip"]), dtype="float32", num_kv_blocks=64)
    engine = llm.engine
    replica = engine.encoders.replicas[0]
    real = replica.encoder

    def broken(pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected encoder failure")

    replica.encoder = broken
    im = random_images([(10, 10)], seed=0)
    with pytest.raises(RuntimeError, match="injected encoder failure"):
        llm.generate(["USER: text only ASSISTANT:", {"prompt": "<image>", "multi_modal_data": {"image": im}}], GREEDY)
    assert not engine.has_unfinished() and not engine.encoding
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_integrity()
    replica.encoder = real  # the engine goes on serving
    assert llm.generate({"prompt": "<image>", "multi_modal_data": {"image": im}}, GREEDY)[0].outputs[0].token_ids
