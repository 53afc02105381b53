"""The parity tests on a CUDA GPU in bfloat16 (`pytest -m gpu`, through the device tool).

Tolerance, and why: bfloat16 keeps 8 mantissa bits, so every matmul output carries a relative
rounding error near 2^-9; lmq and transformers order the same arithmetic differently (fused
q|k|v and gate|up matrices, GQA folded into the query rows instead of repeated K/V, a blocked
cache gathered per step), which moves logits by a few hundredths. Greedy tokens must therefore
match transformers' bf16 `generate` exactly, except that a sequence may diverge at a step
where transformers' own top-2 logits are within TIE_GAP of each other (a near-tie that either
rounding can flip); after such a step the two continuations are different texts and are not
compared further. Prompt log-probabilities must be within LOGPROB_ATOL of transformers' bf16
values.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, random_prompts
from lmq import LLM, SamplingParams

pytestmark = pytest.mark.gpu  # without CUDA, conftest refuses a run of only these, else skips them

TIE_GAP = 0.125  # logits; one bf16 ulp at magnitude 16-32 is 0.125
LOGPROB_ATOL = 0.1
LENGTHS = [1, 7, 33, 64, 150, 300]
NEW = 24


def _hf_greedy_with_gaps(folder, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        top2 = [s[0].float().topk(2).values for s in g.scores]
        out.append((g.sequences[0, len(p):].tolist(), [(t[0] - t[1]).item() for t in top2]))
    return out


def _assert_greedy_parity(ours: list[list[int]], ref: list[tuple[list[int], list[float]]],
                          tie_gap: float = TIE_GAP) -> None:
    for i, (toks, (ref_toks, gaps)) in enumerate(zip(ours, ref, strict=True)):
        assert len(toks) == len(ref_toks), f"prompt {i}: lmq gave {len(toks)} tokens, reference {len(ref_toks)}"
        for step, (a, b) in enumerate(zip(toks, ref_toks)):
            if a != b:
                assert gaps[step] < tie_gap, (f"prompt {i} step {step}: lmq {a} != reference {b} "
                                              f"with a top-2 gap of {gaps[step]:.3f} >= {tie_gap}")
                break


def _llm(folder, **opts) -> LLM:
    return LLM(str(folder), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, **opts)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_greedy_matches_transformers(tiny_models, arch):
    prompts = random_prompts(8, LENGTHS, seed=100 + list(ARCHS).index(arch))
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    ref = _hf_greedy_with_gaps(tiny_models[arch], prompts)
    for opts in ({}, {"max_num_batched_tokens": 40}, {"block_size": 8, "num_kv_blocks": 56}):
        llm = _llm(tiny_models[arch], **opts)
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        _assert_greedy_parity(ours, ref)
        bm = llm.engine.block_manager
        bm.check_integrity()
        assert bm.num_free_blocks == bm.num_blocks


def test_cuda_graph_decode_equals_eager(tiny_models):
    prompts = random_prompts(20, LENGTHS, seed=200)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=2)
    graph_llm, eager_llm = _llm(tiny_models["llama"]), _llm(tiny_models["llama"], enable_cuda_graph=False)
    graph, eager = graph_llm.generate(prompts, params), eager_llm.generate(prompts, params)
    # Every step after the prefills is decode-only: graphs served them, and none exist eagerly.
    assert graph_llm.engine.runner.graphs.replays >= NEW - 1 and eager_llm.engine.runner.graphs is None
    for g, e in zip(graph, eager, strict=True):
        assert len(g.outputs[0].token_ids) == NEW
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for lg, le in zip(g.outputs[0].logprobs, e.outputs[0].logprobs, strict=True):
            t = next(iter(le))
            assert abs(lg[t].logprob - le[t].logprob) < 1e-2


def test_bf16_prompt_logprobs(tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models["qwen3"]
    prompts = random_prompts(3, [40, 130, 9], seed=300)
    outs = _llm(folder).generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    worst = 0.0
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0].float().log_softmax(-1)
        for i in range(1, len(p)):
            worst = max(worst, abs(out.prompt_logprobs[i][p[i]].logprob - ref[i - 1, p[i]].item()))
    assert worst < LOGPROB_ATOL, worst
