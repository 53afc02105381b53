"""Fixtures: tiny random HF models (hidden 64, 2 layers) with a small byte-level BPE tokenizer,
built fresh per test session, and helpers comparing lmq with transformers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import time
from pathlib import Path

import pytest
import torch

import vision  # noqa: F401  (first: makes torchvision, which transformers may import, importable on CPU torch)

# Fresh random weights and inputs every run; the header prints the seed to replay a failure.
SEED = int(os.environ.get("LMQ_TEST_SEED", random.randrange(2**31)))
VOCAB = 384  # model vocab; the tokenizer uses the first ~300 ids
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "lmq serves many fine-tuned variants of one model, with images, on your own GPUs.",
    "Blocked KV caches, continuous batching and chunked prefill keep the GPU busy.",
] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {
    # GQA, tied embeddings, llama3 rope scaling
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
    # qkv bias, untied
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    # sliding window shorter than the longer prompts, untied
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=48)),
    # per-head q/k norm, head_dim independent of hidden size
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
}


# Test modules that import packages only the CPU dev install has (`make setup` installs them all,
# so CI collects everything): where one is missing, as on the GPU image, the module is not
# collected, so `pytest -m gpu tests` collects there instead of stopping at an ImportError.
_NEEDS = {"test_fuzz.py": ("schemathesis", "hypothesis"), "test_structured_output.py": ("jsonschema",),
          "test_tool_calls.py": ("jsonschema",)}
collect_ignore = [f for f, mods in _NEEDS.items() if any(importlib.util.find_spec(m) is None for m in mods)]


def pytest_report_header() -> str:
    return f"lmq test seed: LMQ_TEST_SEED={SEED}"


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it does not select
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests without CUDA: a run of nothing else (`pytest -m gpu`) is an error that says
    nothing could run, not a green run of skips; in a mixed run they are skipped."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or torch.cuda.is_available():
        return
    if len(gpu) == len(items):
        raise pytest.UsageError(f"no CUDA device here: none of the {len(gpu)} GPU tests selected can run "
                                "(run `pytest -m gpu` on a machine with a GPU)")
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


def make_model(folder: Path, arch: str, seed: int = 0, **overrides: object) -> Path:
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(SEED + seed)
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {a: make_model(root / a, a, seed=i) for i, a in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def lora_adapters(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Four peft adapters for the tiny llama (see lora_fixtures.SPECS), in one folder."""
    from lora_fixtures import SPECS, make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: str(make_adapter(tiny_models["llama"], root / name, spec, i))
            for i, (name, spec) in enumerate(SPECS.items())}


@pytest.fixture(scope="session", autouse=True)
def _lmq_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Keep the converted default model where later test runs find it, but never in the repo.
    os.environ.setdefault("LMQ_HOME", str(Path.home() / ".cache" / "lmq"))


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding), never stopping early."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, EOS included
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


def random_prompts(n: int, lengths: list[int], seed: int, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(SEED + seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


PROMPTS = ("The quick brown", "Hello", "What is", "lmq serves", "Blocked KV", "The capital", "fine-tuned")


def assert_same_outputs(a, b) -> None:
    """Two runs' RequestOutputs agree: tokens, text, finish and stop reasons, and logprobs
    (the same candidates, values within 1e-4)."""
    for x, y in zip(a, b, strict=True):
        assert len(x.outputs) == len(y.outputs)
        for cx, cy in zip(x.outputs, y.outputs):
            assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == \
                   (cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)
            assert (cx.logprobs is None) == (cy.logprobs is None)
            for lx, ly in zip(cx.logprobs or [], cy.logprobs or [], strict=True):
                assert lx.keys() == ly.keys()
                assert all(abs(lx[t].logprob - ly[t].logprob) < 1e-4 for t in lx)


def plain_piece(text: str, width: int) -> str | None:
    """A substring of printable ASCII characters after the first one: random models also emit
    bytes that decode to no text, and those make poor stop strings."""
    for i in range(1, len(text) - width + 1):
        piece = text[i:i + width]
        if all(c.isascii() and c.isprintable() and not c.isspace() for c in piece):
            return piece
    return None


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds: waits on the event itself, with a bounded deadline that
    only a broken engine reaches (not a slow machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def held_after(engine, steps: int):
    """An AsyncEngine that runs `steps` more steps, then holds every request where it is until
    the block ends (aborts and calls still apply): "still running" is true by construction, on
    any machine, where a tiny model would otherwise finish before the test looks."""
    engine.set_debug_hooks(pause_after=steps)
    try:
        yield engine
    finally:
        if engine.alive:
            engine.set_debug_hooks()


# -- the web chat in headless Chromium (tests/test_ui*.py) --------------------------------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    from ui_driver import CHROMIUM

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def new_page(browser, request):
    """Opens pages in fresh browser contexts (separate cookies: separate sessions); a screenshot
    of each goes to tests/artifacts/ when the test ends, pass or fail (tests/ui_driver.py)."""
    from ui_driver import ChatPage

    contexts = []

    def make(url: str):
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(ctx)
        return ChatPage(ctx.new_page(), url)

    yield make
    for i, ctx in enumerate(contexts):
        for page in ctx.pages:
            ChatPage(page, "").screenshot(f"{request.node.name}-{i}")
        ctx.close()
