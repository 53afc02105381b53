"""Multi-LoRA on a CUDA GPU in bfloat16 (`pytest -m gpu`): every request of a batch mixing all
four adapters and the base model matches peft's bf16 greedy tokens with that adapter alone,
under CUDA-graph decode, eager decode, and 2 slots with chunked prefill.

Tolerance, and why: as in test_gpu_parity, a sequence may diverge only at a step where peft's
own top-2 logits are within LORA_TIE_GAP of each other. It is twice the base model's 0.125:
each adapted projection adds a second bf16 matmul whose rounding adds to the first, lmq rounds
B * scale once when loading (peft rounds B(Ax) and then the scaled product), and the test's
strong adapters (B scaled up 4x) make larger logits, whose bf16 ulp is larger (0.25 from 32)."""

from __future__ import annotations

import pytest
import test_gpu_parity
import torch

from conftest import random_prompts
from lmq import LLM, SamplingParams

pytestmark = pytest.mark.gpu  # without CUDA, conftest refuses a run of only these, else skips them

NEW = 24
LORA_TIE_GAP = 0.25


def _peft_greedy_with_gaps(base, adapter, prompts) -> list[tuple[list[int], list[float]]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, torch_dtype=torch.bfloat16)
    model = model.cuda().eval()
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        top2 = [s[0].float().topk(2).values for s in g.scores]
        out.append((g.sequences[0, len(p):].tolist(), [(t[0] - t[1]).item() for t in top2]))
    return out


def test_bf16_mixed_adapters_match_peft(tiny_models, lora_adapters):
    base = tiny_models["llama"]
    prompts = random_prompts(6, [3, 30, 90], seed=400)
    names = [None, *lora_adapters]
    ref = {n: _peft_greedy_with_gaps(base, None if n is None else lora_adapters[n], prompts) for n in names}
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    ps = [p for p in prompts for _ in names]
    ns = [n for _ in prompts for n in names]
    for opts in ({}, {"enable_cuda_graph": False}, {"max_loras": 2, "max_num_batched_tokens": 40}):
        # torch_engine, whose ops round as peft's do: turbomind's fused kernels round elsewhere, so
        # its bf16 near-ties flip past the gap (its adapters: test_gpu_turbomind's float32 identity)
        llm = LLM(str(base), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, backend="pytorch",
                  adapters=lora_adapters, **{"max_loras": 4, **opts})
        ours = [o.outputs[0].token_ids for o in llm.generate(ps, params, adapter=ns)]
        test_gpu_parity._assert_greedy_parity(ours, [ref[n][i] for i in range(len(prompts)) for n in names],
                                              LORA_TIE_GAP)
        bm = llm.engine.block_manager
        bm.check_integrity()
        llm.engine.adapters.check_integrity()
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.adapters.pins
