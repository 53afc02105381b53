"""Greedy tokens identical to transformers `generate` (float32, CPU) for every supported
architecture, under chunked prefill, preemption and prefix-cache hits; prompt logprobs close
to transformers' logits."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, hf_greedy, random_prompts
from lmq import LLM, SamplingParams

LENGTHS = [1, 7, 33, 64, 150, 300]  # 1 token to a few hundred, across block boundaries
NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _lmq(folder, **opts) -> LLM:
    return LLM(str(folder), device="cpu", dtype="float32", **opts)


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, GREEDY)
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_transformers(tiny_models, arch):
    prompts = random_prompts(8, LENGTHS, seed=list(ARCHS).index(arch))
    ref = hf_greedy(tiny_models[arch], prompts, NEW)
    assert _tokens(_lmq(tiny_models[arch], kv_cache_gb=0.05), prompts) == ref


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_chunked_prefill_matches(tiny_models, arch):
    # A 40-token budget splits every long prompt into many chunks, mixed with decodes.
    prompts = random_prompts(6, LENGTHS, seed=11)
    llm = _lmq(tiny_models[arch], max_num_batched_tokens=40, kv_cache_gb=0.05)
    assert _tokens(llm, prompts) == hf_greedy(tiny_models[arch], prompts, NEW)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_preemption_matches(tiny_models, arch):
    # All 8 prompts fit in 56 blocks of 8 tokens (52 blocks), their 24 new tokens each do not:
    # running sequences are preempted and recomputed.
    prompts = random_prompts(8, [40, 47, 52, 60], seed=12)
    llm = _lmq(tiny_models[arch], block_size=8, num_kv_blocks=56)
    assert _tokens(llm, prompts) == hf_greedy(tiny_models[arch], prompts, NEW)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_hits_match(tiny_models, arch):
    system = random_prompts(1, [100], seed=13)[0]
    prompts = [system + tail for tail in random_prompts(6, [1, 5, 17, 40], seed=14)]
    llm = _lmq(tiny_models[arch], kv_cache_gb=0.05)
    first = _tokens(llm, prompts[:1])
    rest = _tokens(llm, prompts[1:])
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits >= 5 * 96  # 6 full blocks of the system prompt, for each later prompt
    assert first + rest == hf_greedy(tiny_models[arch], prompts, NEW)


def test_prompt_logprobs_match_transformers(tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models["qwen2"]
    prompts = random_prompts(3, [40, 130, 9], seed=15)
    llm = _lmq(folder, max_num_batched_tokens=64, kv_cache_gb=0.05)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=3))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].log_softmax(-1)  # [P, V]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            entry = out.prompt_logprobs[i]
            # float32 through different but equivalent kernels: 1e-4 absolute on log-probabilities
            assert abs(entry[p[i]].logprob - ref[i - 1, p[i]].item()) < 1e-4
            top = ref[i - 1].topk(3).indices.tolist()
            assert set(top) <= set(entry)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_prompt_logprobs_on_cpu(tiny_models, dtype):
    """16-bit weights and activations: log-probabilities within 0.1 of transformers' in the same
    dtype (8 to 11 mantissa bits; the two order the arithmetic differently, see test_gpu_parity)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_models["llama"]
    prompts = random_prompts(2, [70, 20], seed=16)
    outs = _lmq_dtype(folder, dtype).generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float().log_softmax(-1)
        diffs = [abs(out.prompt_logprobs[i][p[i]].logprob - ref[i - 1, p[i]].item()) for i in range(1, len(p))]
        assert max(diffs) < 0.1, max(diffs)


def _lmq_dtype(folder, dtype: str) -> LLM:
    llm = LLM(str(folder), device="cpu", dtype=dtype, kv_cache_gb=0.05)
    assert llm.engine.config.model.dtype == getattr(torch, dtype)
    assert llm.engine.runner.kv_caches.dtype == getattr(torch, dtype)
    return llm
