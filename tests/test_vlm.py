"""LLaVA end to end on the CPU: greedy tokens identical to transformers'
LlavaForConditionalGeneration and LlavaNextForConditionalGeneration (any-resolution tiles; float32)
for CLIP and SigLIP towers, one and several images per prompt, odd image sizes, mixed with
text-only requests, chunked prefill cutting through images;
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
from vlm_fixtures import TOWERS, HFLlava, image_token_id, make_llava

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("llava")
    models = {t: make_llava(root / t, t, seed=i) for i, t in enumerate(TOWERS)}
    models |= {f"next-{t}": make_llava(root / f"next-{t}", t, seed=10 + i, anyres=True) for i, t in enumerate(TOWERS)}
    return models


def random_images(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(SEED + seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CASES = [  # (prompt, image sizes (w, h)); odd sizes, wide and tall, one or several per prompt
    ("USER: <image>\nWhat is this? ASSISTANT:", [(41, 17)]),
    ("USER: <image>\n<image>\nCompare the two. ASSISTANT:", [(23, 50), (64, 64)]),
    ("USER: Hello there, what is the capital of France? ASSISTANT:", []),
    ("<image>", [(7, 9)]),  # the prompt is only the image: its last position samples the first token
    ("USER: <image> one <image> two <image> three ASSISTANT:", [(33, 31), (12, 80), (90, 11)]),
]


def _prompts(seed: int) -> list[tuple[str, list[Image.Image]]]:
    return [(text, random_images(sizes, seed + i)) for i, (text, sizes) in enumerate(CASES)]


@pytest.mark.parametrize("tower", [*TOWERS, *(f"next-{t}" for t in TOWERS)])
def test_greedy_matches_transformers_batched_with_text_and_chunked_through_images(llava, tower):
    cases = _prompts(seed=10)
    hf = HFLlava(llava[tower])
    ref = [hf.greedy(t, ims, MAX_NEW) for t, ims in cases]
    # One batch mixing image and text-only prompts; then a 16-token budget, so prefill chunks end
    # inside images (25 or 36 positions each; LLaVA-NeXT: 60 to 160) and several prompts share steps.
    for budget in (2048, 16):
        llm = LLM(str(llava[tower]), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=budget)
        prompts = [{"prompt": t, "multi_modal_data": {"image": ims}} if ims else t for t, ims in cases]
        outs = llm.generate(prompts, GREEDY)
        # the placeholder counts are transformers' (LLaVA-NeXT: its processor's, per image size)
        assert [o.prompt_token_ids for o in outs] == [hf.inputs(t, ims)[0] for t, ims in cases]
        assert [o.outputs[0].token_ids for o in outs] == ref, f"budget {budget}"
    # The images matter: other pixels move the first token's distribution (compared as
    # distributions: some random models answer the same token whatever they see). The fed token
    # only marks the row; it is not the image token, which would count as one more image position.
    fed = [0 if image_token_id(llava[tower]) else 1]
    for i, (t, ims) in enumerate(cases):
        if ims:
            others = random_images([im.size for im in ims], seed=99 + i)
            moved = (hf.fed_logprobs(t, others, fed) - hf.fed_logprobs(t, ims, fed)).abs().max().item()
            assert moved > 1e-3, (i, moved)


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
    ref = HFLlava(llava["siglip"]).greedy(prompt, ims, MAX_NEW)
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids == ref


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

    def broken(pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected encoder failure")

    monkeypatch.setattr(replica.encoder, "forward", broken)
    im = random_images([(10, 10)], seed=0)
    with pytest.raises(RuntimeError, match="injected encoder failure"):
        llm.generate(["USER: text only ASSISTANT:", {"prompt": "<image>", "multi_modal_data": {"image": im}}], GREEDY)
    assert not engine.has_unfinished() and not engine.encoding
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_integrity()
    monkeypatch.undo()  # the engine goes on serving
    assert llm.generate({"prompt": "<image>", "multi_modal_data": {"image": im}}, GREEDY)[0].outputs[0].token_ids


def _llava_adapter(base, folder, rank: int, targets: str, seed: int):
    """A peft adapter on the language model of a LLaVA model (regex targets, as one trains them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(SEED + 2000 + seed)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(folder)
    return folder


def test_multi_lora_on_a_vlm_mixes_adapters_in_one_batch_as_peft(llava, tmp_path):
    from peft import PeftModel

    base = llava["clip"]
    adapters = {"qv": _llava_adapter(base, tmp_path / "qv", 4, r".*language_model.*\.(q_proj|v_proj)", 0),
                "mlp": _llava_adapter(base, tmp_path / "mlp", 8, r".*language_model.*\.(gate_proj|down_proj)", 1)}
    cases = _prompts(seed=30)[:2]
    llm = LLM(str(base), dtype="float32", num_kv_blocks=256, adapters={k: str(v) for k, v in adapters.items()},
              max_num_batched_tokens=16)
    names = [None, "qv", "mlp"]
    prompts = [{"prompt": t, "multi_modal_data": {"image": ims}} for t, ims in cases]
    batch = [(p, c, n) for p, c in zip(prompts, cases) for n in names]
    outs = llm.generate([p for p, _, _ in batch], GREEDY, adapter=[n for _, _, n in batch])
    for (_, (text, ims), name), out in zip(batch, outs):
        hf = HFLlava(base)
        if name is not None:
            hf.model = PeftModel.from_pretrained(hf.model, adapters[name]).eval()
        assert out.outputs[0].token_ids == hf.greedy(text, ims, MAX_NEW), name
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:3]}) == 3  # every adapter changes the answer
    tower = _llava_adapter(base, tmp_path / "tower", 4, r".*vision_tower.*\.q_proj", 2)
    with pytest.raises(ValueError, match="language model only, not to a vision tower"):
        llm.load_adapter("tower", str(tower))
