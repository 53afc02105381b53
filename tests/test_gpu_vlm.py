"""LLaVA on a CUDA GPU in bfloat16 (`pytest -m gpu`). The method of test_gpu_parity.py: greedy
tokens equal transformers' own bf16 `generate` except where its top-2 logits are within TIE_GAP
(a near-tie either rounding may flip); and against transformers' float32 tokens lmq's bf16 run
may not diverge sooner, summed over the prompts, than transformers' bf16 run does."""

from __future__ import annotations

import pytest
import torch
from test_gpu_parity import TIE_GAP
from test_vlm import _prompts

from lmq import LLM, SamplingParams
from vlm_fixtures import TOWERS, HFLlava, make_llava

pytestmark = pytest.mark.gpu
NEW = 24


def _agree(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy runs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("anyres", [False, True], ids=["llava", "next"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_bf16_llava_matches_transformers_and_diverges_no_sooner(tmp_path, tower, anyres):
    folder = make_llava(tmp_path / tower, tower, seed=40, anyres=anyres)
    # 40 prompts: each one's divergence step is close to random, their mean much less so
    cases = [c for seed in range(50, 130, 10) for c in _prompts(seed=seed)]
    hf32, hf16 = HFLlava(folder, torch.float32, "cuda"), HFLlava(folder, torch.bfloat16, "cuda")
    ref32 = [hf32.greedy(t, ims, NEW) for t, ims in cases]
    ref16, gaps = [], []
    for t, ims in cases:
        g: list[float] = []
        ref16.append(hf16.greedy(t, ims, NEW, g))
        gaps.append(g)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    for opts in ({}, {"max_num_batched_tokens": 16}):  # the second cuts prefill chunks inside images
        llm = LLM(str(folder), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, **opts)
        prompts = [{"prompt": t, "multi_modal_data": {"image": ims}} if ims else t for t, ims in cases]
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        for i, (toks, ref, gap) in enumerate(zip(ours, ref16, gaps, strict=True)):
            assert len(toks) == len(ref) == NEW
            k = _agree(toks, ref)
            assert k == NEW or gap[k] < TIE_GAP, f"prompt {i} step {k}: top-2 gap {gap[k]:.3f} >= {TIE_GAP}"
        lmq_agree = sum(_agree(o, r) for o, r in zip(ours, ref32))
        hf_agree = sum(_agree(o, r) for o, r in zip(ref16, ref32))
        assert lmq_agree >= hf_agree, f"lmq bf16 keeps {lmq_agree} fp32 tokens, transformers bf16 {hf_agree}"
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
