"""lmq awq on a CUDA GPU (`pytest -m gpu`): quantizing with --device cuda (float16 layers) gives
a checkpoint that lmq on the CPU runs exactly as transformers runs its dequantized weights, and
lmq's float16 AWQ linears on the GPU score prompts as transformers' float16 does on the same
dequantized weights."""

from __future__ import annotations

import pytest
import torch
from awq_fixtures import dense_folder

from conftest import hf_greedy, random_prompts
from lmq import LLM, SamplingParams
from quant_tools.awq import AWQConfig, quantize_checkpoint
from quant_tools.wikitext import split

pytestmark = pytest.mark.gpu
NEW = 16


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_on_cuda_and_run_float16(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    config = AWQConfig(group_size=32, calib_samples=8, calib_seqlen=64, device="cuda")
    folder = quantize_checkpoint(str(tiny_models[arch]), str(tmp_path / "q"), config, split(held_out=False)[:6])
    dense = dense_folder(folder, tiny_models[arch], tmp_path / "dense")
    prompts = random_prompts(4, [5, 30, 70], seed=60)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    cpu = LLM(str(folder), device="cpu", dtype="float32", kv_cache_gb=0.05).generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in cpu] == hf_greedy(dense, prompts, NEW)

    llm = LLM(str(folder), device="cuda", dtype="float16", gpu_memory_utilization=0.2)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))
    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float16).cuda().eval()
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0].float().log_softmax(-1)
        diffs = [abs(out.prompt_logprobs[i][p[i]].logprob - ref[i - 1, p[i]].item()) for i in range(1, len(p))]
        assert max(diffs) < 0.1, max(diffs)  # fp16 in two orders of arithmetic, as test_parity's 16-bit test
