"""LLMEngine behaviour: abort frees blocks at once, request validation, streaming, the LLM API."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from conftest import PROMPTS, plain_piece, random_prompts
from lmq import LLM, SamplingParams, backends


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), device="cpu", block_size=8, num_kv_blocks=200,
               max_num_batched_tokens=64)


def _idle(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_abort_mid_prefill_and_mid_decode_frees_blocks(llm):
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    prompts = random_prompts(4, [150, 20, 90, 5], seed=31)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, params)
    eng.step()  # the 150-token prompt is mid-prefill (budget 64), nothing else ran yet
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    out = eng.abort("a0")
    assert out.outputs[0].finish_reason == "abort" and out.finished
    for _ in range(6):
        eng.step()
    outs = [eng.abort(f"a{i}") for i in (1, 2, 3)]
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    assert eng.abort("a1") is None  # already gone
    _idle(llm)
    assert not eng.has_unfinished()


def test_validation_names_field_limit_and_value(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match=r"prompt \(1020 tokens\) \+ max_tokens \(10\) = 1030 exceeds .*1024"):
        eng.add_request("v0", [5] * 1020, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.add_request("v1", [], SamplingParams())
    with pytest.raises(ValueError, match=r"token id 99999 is out of range \[0, 384\)"):
        eng.add_request("v2", [5, 99999], SamplingParams())
    with pytest.raises(ValueError, match="n=1000 exceeds max_num_seqs=256"):
        eng.add_request("v3", [5], SamplingParams(n=1000))
    eng.add_request("v4", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id='v4' is already in use"):
        eng.add_request("v4", [5, 6], SamplingParams())
    eng.abort("v4")
    _idle(llm)


def test_failed_batch_submission_leaves_nothing_behind(llm):
    with pytest.raises(ValueError):
        llm.generate([[5, 6, 7], [5] * 2000], SamplingParams(max_tokens=4))
    _idle(llm)


def test_stream_deltas_equal_generate_text(llm):
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    whole = llm.generate(prompt, params)[0].outputs[0].text
    assert "".join(llm.stream(prompt, params)) == whole
    _idle(llm)


def test_generate_accepts_text_ids_and_per_prompt_params(llm):
    outs = llm.generate(["Hello there", [5, 6, 7]], [SamplingParams(max_tokens=3), SamplingParams(max_tokens=5)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello there")
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])
    _idle(llm)


def test_chat_applies_the_template(llm):
    conv = [{"role": "user", "content": "Hello"}]
    out = llm.chat([conv, conv], SamplingParams(temperature=0.0, max_tokens=4))
    expected = llm.tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert out[0].prompt_token_ids == expected == out[1].prompt_token_ids
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids


def test_backend_choice(tiny_models, caplog):
    """An explicit backend that cannot serve the config is an error naming every reason; `auto`
    passes over it, and the start-up log says which engine it took and why."""
    head_dim = LLM(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.01).engine.config.model.head_dim
    with pytest.raises(ValueError, match=r"backend='turbomind' cannot serve this model: it runs on CUDA GPUs only "
                                         rf"\(device='cpu'\);.*head_dim 64 or 128, the model has {head_dim}"):
        LLM(str(tiny_models["llama"]), device="cpu", backend="turbomind")
    with pytest.raises(ValueError, match="backend='tensorrt' is invalid: must be one of auto, pytorch, turbomind"):
        LLM(str(tiny_models["llama"]), device="cpu", backend="tensorrt")
    with caplog.at_level(logging.INFO, logger="lmq"):
        llm = LLM(str(tiny_models["llama"]), device="cpu", backend="auto", kv_cache_gb=0.01)
    assert llm.engine.config.backend == "pytorch"
    assert "lmq: backend pytorch (auto: not turbomind: it runs on CUDA GPUs only (device='cpu')" in caplog.text


def test_choose_backend_takes_the_first_that_serves_everything(tiny_models, monkeypatch):
    config = LLM(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.01).engine.config
    assert backends.choose_backend("pytorch", config) == backends.BackendChoice("pytorch", "asked for")
    able = backends.Backend("turbomind", lambda cfg: [], backends.BACKENDS["turbomind"].make_runner)
    monkeypatch.setitem(backends.BACKENDS, "turbomind", able)
    choice = backends.choose_backend("auto", config)
    assert choice.name == "turbomind" and "supports the model and every requested feature" in choice.reason


def test_abort_before_fork_finishes_the_request(llm):
    eng = llm.engine
    eng.add_request("fork", [5, 6, 7, 8], SamplingParams(n=3, max_tokens=5))
    out = eng.abort("fork")  # still waiting: only sample 0 exists
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"]
    _idle(llm)


def test_huge_top_k_is_clamped_to_the_vocabulary(llm):
    out = llm.generate([5, 6, 7], SamplingParams(top_k=10**30, top_p=0.9, max_tokens=4, seed=1))[0]
    assert len(out.outputs[0].token_ids) == 4
    _idle(llm)


def test_streamed_text_never_shows_a_stop_string_it_later_cuts(llm):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    for prompt in PROMPTS:
        text = llm.generate(prompt, params)[0].outputs[0].text
        if stop := plain_piece(text, 2):  # spans two tokens whenever its characters come from two
            break
    assert stop, "no output with two plain characters"
    whole = llm.generate(prompt, replace(params, stop=(stop,)))[0].outputs[0].text
    deltas = list(llm.stream(prompt, replace(params, stop=(stop,))))
    assert "".join(deltas) == whole == text[:text.index(stop)]
    _idle(llm)


def test_outputs_built_after_the_next_launch_equal_step_outputs(llm):
    """The engine process builds a step's outputs after launching the next step (they overlap
    the device's work): streamed text and tokens are those of `generate`, and an aborted
    streaming request's text covers every token it got."""
    eng = llm.engine
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)]
    prompts = random_prompts(3, [70, 9, 33], seed=41)
    expected = llm.generate(prompts, params)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"o{i}", p, sp, stream=True)
    texts: dict[tuple[str, int], list[str]] = {}
    last: dict[str, object] = {}
    touched, steps = [], 0
    while eng.has_unfinished() or touched:
        step = eng.launch_step() if eng.has_unfinished() else None
        for out in eng.outputs(touched):  # the previous step's, while this one is in flight
            last[out.request_id] = out
            for c in out.outputs:
                texts.setdefault((out.request_id, c.index), []).append(c.text)
        touched = eng.finish_step(step) if step is not None else []
        steps += 1
        if steps == 12:
            touched.append(eng.abort_request("o2"))
    for i in (0, 1):
        assert [c.token_ids for c in last[f"o{i}"].outputs] == [c.token_ids for c in expected[i].outputs]
        assert [c.text for c in last[f"o{i}"].outputs] == [c.text for c in expected[i].outputs]
    for (rid, _), seen in texts.items():  # each streamed text extends the one before
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), rid
    aborted = last["o2"].outputs[0]
    assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 40
    assert aborted.token_ids == expected[2].outputs[0].token_ids[:len(aborted.token_ids)]
    upto = llm.generate(prompts[2], replace(params[2], max_tokens=len(aborted.token_ids)))[0].outputs[0]
    # Decoded incrementally, an incomplete last character is held back; else the same text.
    assert aborted.text == upto.text or upto.text.endswith("\ufffd") and upto.text.startswith(aborted.text)
    _idle(llm)


def test_loading_leaves_torch_global_state_alone(tiny_models):
    """Building an engine (bfloat16 weights) and generating, seeded or not, changes neither
    torch's default dtype nor its global RNG; the block table rows of finished sequences are freed."""
    import torch

    state, dtype = torch.random.get_rng_state(), torch.get_default_dtype()
    llm = LLM(str(tiny_models["llama"]), device="cpu", dtype="bfloat16", num_kv_blocks=64)
    assert llm.engine.runner.model.embed_tokens.dtype == torch.bfloat16
    llm.generate([[5, 6, 7], [8, 9]], [SamplingParams(max_tokens=4, seed=3), SamplingParams(max_tokens=4)])
    assert torch.get_default_dtype() == dtype and torch.equal(torch.random.get_rng_state(), state)
    assert not llm.engine.builder.blocks.rows
