"""turbomind on a CUDA GPU (`pytest -m gpu`): each kernel against its torch_engine op over fresh
random inputs, and the engine end to end against transformers.

Tolerances (max |turbomind - torch|, elementwise), and why: float32 differs only in summation
order and fast-math exp/rsqrt (a few ulp); half and bfloat16 outputs are rounded once from float32
accumulators where torch may round intermediate sums too, so they may differ by one or two ulp of
the output (|x| < 4 here: 2^-9 and 2^-6 relative, a little more near softmax's extremes).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import SEED, hf_greedy, make_model, random_prompts
from lmq import LLM, SamplingParams
from lmq.step_input import StepInput
from torch_engine import ops as ref
from torch_engine.attention_metadata import AttentionMetadata
from turbomind import awq_layout
from turbomind.launch import DECODE_STAGE_SWEEP

pytestmark = pytest.mark.gpu

ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = list(ATOL)


@pytest.fixture(scope="module")
def tm():
    from turbomind import ops

    return ops


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err <= ATOL[dtype], f"{what}: max |turbomind - torch| = {err:.3g} > {ATOL[dtype]} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(1, 64), (7, 2048), (33, 4096), (130, 1000), (2, 16384), (1, 32768), (3, 1001)])
def test_rms_norm(tm, dtype, rows, n):
    g = torch.Generator("cuda").manual_seed(SEED + rows)
    x = torch.randn(rows, n + 8, device="cuda", generator=g).to(dtype)[:, :n]  # a strided view
    res = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    for r in (None, res):
        out, new_res = tm.rms_norm(x, w, 1e-5, r)
        ref_out, ref_res = ref.rms_norm(x, w, 1e-5, r)
        _close(out, ref_out, dtype, f"rms_norm residual={r is not None}")
        assert torch.equal(new_res, ref_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, inter", [(1, 128), (5, 8192), (64, 1000)])
def test_silu_and_mul(tm, dtype, t, inter):
    x = torch.randn(t, 2 * inter, device="cuda", generator=torch.Generator("cuda").manual_seed(SEED)).to(dtype)
    _close(tm.silu_and_mul(x), ref.silu_and_mul(x), dtype, "silu_and_mul")


def _cos_sin(max_len: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    f = torch.outer(torch.arange(max_len, device="cuda").float(), inv)
    emb = torch.cat((f, f), dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype)  # [max_len, 2, D]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, h, hkv, d, bs", [(1, 32, 8, 128, 16), (37, 8, 8, 64, 32), (300, 28, 4, 128, 1)])
def test_rotary_write_kv(tm, dtype, t, h, hkv, d, bs):
    g = torch.Generator("cuda").manual_seed(SEED + t)
    qkv = torch.randn(t, (h + 2 * hkv) * d, device="cuda", generator=g).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([h * d, hkv * d, hkv * d], dim=1))  # strided views
    blocks = (t + bs - 1) // bs + 3
    slots = torch.randperm(blocks * bs, device="cuda", generator=g)[:t]
    slots[t // 2] = -1 if t > 2 else slots[t // 2]  # a token that writes nothing
    pos = torch.randint(0, 4000, (t,), device="cuda", generator=g)
    cs = _cos_sin(4096, d, dtype)
    caches = [torch.randn(blocks, bs, hkv, d, device="cuda", generator=g).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]  # the oracle's start equal: slots nobody writes must stay so
    out = tm.rotary_write_kv(pos, q, k, v, cs, caches[0], caches[1], slots)
    keep = slots >= 0
    ref_q = ref.rotary_write_kv(pos[keep], q[keep], k[keep], v[keep], cs, caches[2], caches[3], slots[keep])
    _close(out[keep], ref_q, dtype, "rotary q")
    ref_q_all, _ = ref.rotary(pos, q, k, cs)
    _close(out, ref_q_all, dtype, "rotary q (all rows)")
    for ours, theirs, what in ((caches[0], caches[2], "k cache"), (caches[1], caches[3], "v cache")):
        _close(ours, theirs, dtype, what)


def _step(query_lens: list[int], context_lens: list[int], num_decodes: int, bs: int, num_blocks: int,
          g: torch.Generator) -> StepInput:
    """A step over random, shuffled blocks: sequence b's chunk is its last query_lens[b] positions."""
    nb = max((c + bs - 1) // bs for c in context_lens)
    perm = torch.randperm(num_blocks, device="cuda", generator=g)
    tables = perm[:len(query_lens) * nb].view(len(query_lens), nb).int()
    pos = torch.cat([torch.arange(c - q, c, device="cuda") for q, c in zip(query_lens, context_lens)])
    seg = torch.repeat_interleave(torch.arange(len(query_lens), device="cuda"),
                                  torch.tensor(query_lens, device="cuda"))
    slots = tables[seg, pos // bs].long() * bs + pos % bs
    qs = torch.tensor([0, *query_lens], device="cuda").cumsum(0).int()
    return StepInput(token_ids=pos, positions=pos, slot_mapping=slots, query_start=qs,
                     seq_lens=torch.tensor(context_lens, device="cuda", dtype=torch.int32), block_tables=tables,
                     num_decodes=num_decodes, query_lens=tuple(query_lens), context_lens=tuple(context_lens),
                     logit_rows=pos[:0], num_sample_rows=0)


ATTENTION_CASES = [  # (dtype, H, Hkv, D, block size, window)
    (torch.bfloat16, 32, 8, 128, 16, None), (torch.float16, 32, 8, 128, 32, None), (torch.float32, 8, 8, 64, 16, None),
    (torch.bfloat16, 28, 4, 128, 64, None), (torch.bfloat16, 16, 1, 64, 8, 100), (torch.float32, 12, 4, 128, 1, None),
    (torch.float16, 32, 2, 64, 128, 700),
]


@pytest.mark.parametrize("dtype, h, hkv, d, bs, window", ATTENTION_CASES)
def test_attention_mixed_step(tm, dtype, h, hkv, d, bs, window):
    """Decodes (contexts from 1 to 8k: no split, split-K) and prefill chunks with earlier context
    (odd lengths, a chunk of one token) in one step, against torch_engine's attention."""
    rng = random.Random(SEED + h + d + bs)
    g = torch.Generator("cuda").manual_seed(SEED + bs)
    decodes = [1, 2, 17, rng.randint(100, 600), 4096, 8192, rng.randint(1, 3000)]
    chunks = [(5, 5), (77, 77), (1, 300), (130, 1000), (33, 4100)]  # (query len, context len)
    qlens = [1] * len(decodes) + [q for q, _ in chunks]
    ctx = decodes + [c for _, c in chunks]
    nb = max((c + bs - 1) // bs for c in ctx)
    step = _step(qlens, ctx, len(decodes), bs, len(ctx) * nb + 4, g)
    kc = torch.randn(len(ctx) * nb + 4, bs, hkv, d, device="cuda", generator=g).to(dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(step.num_tokens, h, d, device="cuda", generator=g).to(dtype)
    meta = AttentionMetadata.from_step(step, bs)
    with ref.attention_backends(torch.device("cuda")):
        expected = ref.attention(q, kc, vc, meta, d ** -0.5, window)
    got = tm.attention(q, kc, vc, meta, d ** -0.5, window)
    nd = len(decodes)
    _close(got[:nd], expected[:nd], dtype, "decode attention")
    _close(got[nd:], expected[nd:], dtype, "prefill attention")


@pytest.mark.parametrize("stages", [None, *DECODE_STAGE_SWEEP])
@pytest.mark.parametrize("b, ctx", [(1, 33), (3, 1000), (64, 4096)])
def test_decode_attention_batch_shapes(tm, monkeypatch, b, ctx, stages):
    """Batch sizes that give split-K (1, 3) and a full grid without it (64 x 4096, the benchmark's
    shape), at the default pipeline depth and at each depth the benchmark sweeps."""
    if stages is not None:
        monkeypatch.setattr(tm, "DECODE_STAGES", stages)
    g = torch.Generator("cuda").manual_seed(SEED + b)
    bs, dtype = 16, torch.bfloat16
    step = _step([1] * b, [ctx - i % 7 for i in range(b)], b, bs, b * ((ctx + bs - 1) // bs) + 1, g)
    kc = torch.randn(step.block_tables.numel() + 1, bs, 8, 128, device="cuda", generator=g).to(dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(b, 32, 128, device="cuda", generator=g).to(dtype)
    meta = AttentionMetadata.from_step(step, bs)
    with ref.attention_backends(torch.device("cuda")):
        expected = ref.attention(q, kc, vc, meta, 128 ** -0.5)
    _close(tm.attention(q, kc, vc, meta, 128 ** -0.5), expected, dtype, "decode attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n", [(1, 2048, 3072), (2, 8192, 2048), (4, 2048, 16384), (3, 4096, 14336),
                                     (1, 136, 72), (1, 2048, 128256), (2, 136, 77)])
def test_dense_gemv(tm, dtype, m, k, n):
    """gemv.cu against F.linear (cuBLAS, fp32 accumulate) with and without a bias, on x rows of a
    wider tensor; turbomind's linear routes decode rows to it and equals it."""
    g = torch.Generator("cuda").manual_seed(SEED + m + k + n)
    x = torch.randn(m, k + 8, device="cuda", generator=g).to(dtype)[:, :k]  # row stride k + 8
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    for b in (None, bias):
        expected = F.linear(x, w, b)
        got = tm.dense_gemv(x, w, b)
        _gemm_close(got, expected)
        assert torch.equal(tm.linear(x, w, b), got)


def _awq_case(m: int, k: int, n: int, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """x [m, k] and AutoAWQ's packed (qweight, qzeros, scales, group) of a random [k, n] weight."""
    from quant_tools.awq_format import pack

    g = torch.Generator("cuda").manual_seed(SEED + m + n + k)
    q = torch.randint(0, 16, (k, n), device="cuda", generator=g)
    z = torch.randint(0, 16, (k // group, n), device="cuda", generator=g)
    scales = (0.01 + 0.02 * torch.rand(k // group, n, device="cuda", generator=g)).half()
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    return x, (pack(q), pack(z), scales, group)


def _gemm_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A 16-bit GEMM against its oracle: both accumulate in fp32 (the oracles round AWQ's
    dequantized weight to x's dtype first; awq_gemv sums q - z exactly and scales the sum);
    what differs is the summation order and the output's rounding: within 4 eps of the largest |y|
    (eps: bf16 2^-7, fp16 2^-10; one ulp of |y| is at most eps |y|)."""
    err = (got.float() - expected.float()).abs().max().item()
    top = expected.float().abs().max().item()
    assert err <= 4 * torch.finfo(expected.dtype).eps * top + 1e-3, (err, top)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n, group", [(1, 4096, 4096, 128), (3, 4096, 14336, 128), (8, 14336, 4096, 128),
                                            (5, 576, 1536, 64), (2, 256, 72, 32), (4, 4096, 6144, 128),
                                            (1, 2048, 16, 64), (7, 1024, 28672, 32), (2, 4096, 4096, 128),
                                            (3, 576, 1536, 64), (1, 32, 256, 32)])
def test_awq_gemv(tm, dtype, m, k, n, group):
    """The W4A16 GEMV (decode rows) against dequantize-then-matmul, for each packed-column
    width per thread (vec: 4 is halved past 4 rows, and where the packed columns are not a
    multiple of it; 576 -> 1536 at 3 rows leaves a partial last CTA at 4, 32 inputs at group 32
    give each thread 4, fewer than its loads in flight)."""
    x, args = _awq_case(m, k, n, group, dtype)
    expected = ref.awq_linear(x, *args)
    for vec in (1, 2, 4):
        _gemm_close(tm.awq_gemv(x, *args, vec=vec), expected)
    got = tm.awq_linear(x, *args)
    _gemm_close(got, expected)
    bias = torch.randn(n, device="cuda").to(dtype)
    _gemm_close(tm.awq_linear(x, *args, bias), (got.float() + bias.float()).to(dtype))  # y + bias, rounded once


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n, group", [(9, 4096, 4096, 128), (128, 4096, 14336, 128), (128, 14336, 4096, 128),
                                            (37, 576, 1536, 64), (100, 256, 128, 32), (300, 2048, 6144, 128),
                                            (64, 4096, 1024, 64)])
def test_awq_gemm(tm, dtype, m, k, n, group):
    """The tensor-core W4A16 GEMM over AutoAWQ's layout (odd row counts past its 64-row tiles,
    split-K on narrow outputs, every group size it takes) against dequantize-then-matmul; and
    awq_linear routes rows past awq_gemv's to it."""
    x, args = _awq_case(m, k, n, group, dtype)
    expected = ref.awq_linear(x, *args)
    _gemm_close(tm.awq_gemm(x, *args), expected)
    _gemm_close(tm.awq_linear(x, *args), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n, group", [(1, 4096, 4096, 128), (3, 4096, 14336, 128), (8, 14336, 4096, 128),
                                            (16, 4096, 6144, 128), (17, 576, 1536, 64), (33, 2048, 192, 32),
                                            (5, 256, 320, 32), (64, 4096, 1024, 64), (100, 256, 128, 32),
                                            (128, 4096, 14336, 128), (300, 2048, 6144, 128), (1, 32, 256, 32),
                                            (2100, 256, 128, 32)])
def test_awq_mma(tm, dtype, m, k, n, group):
    """The W4A16 kernel over turbomind's repacked layout (awq_pack), every tile it has for the
    group (16 to 64 rows a CTA, 32 or 64 inputs a stage): one row, rows past a tile, partial
    CTAs along the outputs (192 and 320 outputs leave warps idle), split-K, against
    dequantize-then-matmul on the AutoAWQ tensors with the scales in x's dtype (as the model
    loads them); awq_linear equals it, with a bias, and past AWQ_MMA_MAX_ROWS too (cuBLAS)."""
    from turbomind.launch import AWQ_MMA_BKS, AWQ_MMA_ROW_TILES, awq_mma_stages

    x, (qweight, qzeros, scales, _) = _awq_case(m, k, n, group, dtype)
    scales = scales.to(dtype)
    expected = ref.awq_linear(x, qweight, qzeros, scales, group)
    packed = awq_layout.repack(qweight, qzeros, scales, dtype)
    if m <= tm.AWQ_MMA_MAX_ROWS:
        for mf in AWQ_MMA_ROW_TILES:
            for bk in (b for b in AWQ_MMA_BKS if group % b == 0):
                _gemm_close(tm.awq_mma(x, *packed, group, tile=(mf, bk, awq_mma_stages(mf, bk))), expected)
    got = tm.awq_linear(x, *packed, group)
    _gemm_close(got, expected)
    bias = torch.randn(n, device="cuda").to(dtype)
    _gemm_close(tm.awq_linear(x, *packed, group, bias), (got.float() + bias.float()).to(dtype))  # rounded once


LORA_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # the oracle rounds h and the delta too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts, in_features, rank, with_rows", [([2048, 512, 512], 2048, 16, False),
                                                                  ([8192, 8192], 2048, 8, True),
                                                                  ([4096], 14336, 16, False),
                                                                  ([40, 24, 24], 48, 4, True),
                                                                  ([36, 30, 30], 64, 12, False)])
def test_lora_gather_kernels(tm, dtype, parts, in_features, rank, with_rows):
    """lora.cu's shrink/expand (each token reads its own slot) against lora.ops.add_lora (every
    slot, masked by the one-hot): mixed slots and base tokens, ranks under the step's bucket,
    eager steps' row subsets and graph steps' all-rows form; rank x parts not a multiple of the
    shrink's rows per CTA; part starts that only allow the expand's 2-column form (the last case)."""
    from lora.ops import LoRAMetadata, LoRAStack, add_lora

    g = torch.Generator("cuda").manual_seed(SEED + sum(parts) + rank)
    num_slots, tokens = 6, 37
    stack = LoRAStack(parts, in_features, 16, num_slots, dtype, "cuda")
    for slot in range(num_slots - 1):  # the last slot stays empty
        r = 1 + (slot * 5) % rank
        for p, width in enumerate(parts):
            a = torch.randn(r, in_features, device="cuda", generator=g) * in_features ** -0.5
            stack.set(slot, p, a.to(dtype), (0.1 * torch.randn(r, width, device="cuda", generator=g)).to(dtype))
    x = torch.randn(tokens, in_features, device="cuda", generator=g).to(dtype)
    y = torch.randn(tokens, sum(parts), device="cuda", generator=g).to(dtype)
    slots = torch.randint(-1, num_slots, (tokens,), device="cuda", generator=g)
    rows = None
    if with_rows:  # eager: only the adapter tokens' rows are computed
        rows = torch.nonzero(slots >= 0).flatten()
        slots = slots[rows]
    onehot = (slots[:, None] == torch.arange(num_slots, device="cuda")[None, :]).to(dtype)
    meta = LoRAMetadata(rank, onehot, rows, slots)
    expected = add_lora(y.clone(), x, stack, meta)
    got = tm.add_lora(y.clone(), x, stack, meta)
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= LORA_RTOL[dtype] * max(1.0, expected.float().abs().max().item()), (err, dtype)


@pytest.mark.parametrize("rows, vocab", [(1, 128256), (1, 32000), (130, 128256), (7, 100), (3, 1), (40, 2049)])
def test_argmax_rows_equals_torch_argmax(tm, rows, vocab):
    """Ties to the lower index (every third row's maximum copied half the row away: a later or,
    wrapping, an earlier place), an all -inf row to 0, NaN above all (two in a row: the first
    wins), and rows of a wider tensor (a row stride past V)."""
    g = torch.Generator("cuda").manual_seed(SEED + rows + vocab)
    wide = torch.randn(rows, vocab + 5, device="cuda", generator=g)
    logits = wide[:, :vocab]
    for r in range(0, rows, 3):
        top = int(logits[r].argmax())
        logits[r, (top + vocab // 2) % vocab] = logits[r, top]
    if rows > 1:
        logits[1] = float("-inf")
    if rows > 2:
        logits[2, vocab - 1] = logits[2, vocab // 3] = float("nan")
    assert torch.equal(tm.argmax_rows(logits), logits.argmax(-1))


@pytest.mark.parametrize("rows, vocab", [(1, 32000), (130, 128256), (64, 49152), (7, 100)])
def test_sample_race_draws_as_the_torch_sampler(tm, rows, vocab):
    """sample.cu against lmq.sampling's race on the same keys (counter_exponentials' draws):
    the same token, except where two candidates' scores log p - log q tie within float32 rounding
    (then the kernel's pick must score as high, in float64, to 1e-5)."""
    from lmq import SamplingParams
    from lmq.sampling import SamplerRow, _random_sample, counter_exponentials, step_seed

    g = torch.Generator("cuda").manual_seed(SEED + rows)
    logits = 3 * torch.randn(rows, vocab, device="cuda", generator=g)
    logits[logits < -4] = float("-inf")  # filtered tokens (top-k / top-p / min-p) never win
    keys = [step_seed(SEED + r, r) for r in range(rows)]
    signed = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys], device="cuda")
    expected = _random_sample(logits, [SamplerRow(SamplingParams(), [], [], seed=k) for k in keys], None)
    got = tm.sample_race(logits, signed)
    assert torch.isfinite(logits.gather(1, got[:, None])).all()
    score = logits.double() - counter_exponentials(signed, vocab).double().log()  # [R, V]
    gap = score.gather(1, expected[:, None]) - score.gather(1, got[:, None])
    assert (gap.abs() <= 1e-5 * score.gather(1, expected[:, None]).abs().clamp(min=1)).all(), gap.abs().max()
    assert (got == expected).float().mean() >= 0.99


# -- end to end ----------------------------------------------------------------------------------
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("wide")
    extra = {"qwen3": dict(head_dim=64), "mistral": dict(sliding_window=48)}
    return {a: make_model(root / a, a, seed=i, **WIDE, **extra.get(a, {}))
            for i, a in enumerate(("llama", "qwen2", "mistral", "qwen3"))}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_float32_greedy_identical_to_transformers(wide_models, arch):
    """Graphs and eager, chunked prefill (a budget of 64 tokens), prefix-cache hits (each prompt
    twice) and async scheduling: every token equals transformers' float32 greedy."""
    prompts = random_prompts(6, [1, 9, 64, 150, 300, 77], seed=3)
    expected = hf_greedy(wide_models[arch], prompts, 24, torch.float32, "cuda")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for opts in ({}, {"enforce_eager": True}, {"max_num_batched_tokens": 64, "enable_prefix_caching": True},
                 {"async_scheduling": True, "max_num_batched_tokens": 64}):
        llm = LLM(str(wide_models[arch]), device="cuda", dtype="float32", backend="turbomind",
                  gpu_memory_utilization=0.2, **opts)
        assert llm.engine.config.backend == "turbomind"
        for _ in range(2 if opts.get("enable_prefix_caching") else 1):
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            assert got == expected, (arch, opts)
        del llm
        torch.cuda.empty_cache()


def test_auto_takes_turbomind_on_cuda(wide_models, caplog):
    """On a CUDA GPU `auto` takes turbomind for a model it serves, and says so at start-up."""
    import logging

    with caplog.at_level(logging.INFO, logger="lmq"):
        llm = LLM(str(wide_models["llama"]), device="cuda", dtype="float32", gpu_memory_utilization=0.2)
    assert llm.engine.config.backend == "turbomind"
    assert "lmq: backend turbomind (auto: it supports the model and every requested feature)" in caplog.text
    del llm
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_async_scheduling_on_cuda_equals_synchronous(wide_models, backend):
    """On the GPU the step in flight really overlaps: seeded sampling, logprobs (read back from
    pinned copies behind their own step) and stop tokens equal the synchronous engine's."""
    prompts = random_prompts(8, [5, 40, 130, 17], seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    params = [replace(greedy, logprobs=3), *[replace(greedy, temperature=0.9, top_k=20, seed=11 + i, logprobs=1)
                                             for i in range(3)], *[greedy] * 4]
    outs = []
    for opts in ({}, {"async_scheduling": True}):
        llm = LLM(str(wide_models["llama"]), device="cuda", dtype="float32", backend=backend,
                  gpu_memory_utilization=0.2, **opts)
        outs.append(llm.generate(prompts, params))
        del llm
        torch.cuda.empty_cache()
    for a, b in zip(*outs, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs or [], y.logprobs or [], strict=True):
            assert lx.keys() == ly.keys() and all(abs(lx[t].logprob - ly[t].logprob) < 1e-4 for t in lx)


@pytest.mark.parametrize("backend", ["turbomind", "pytorch"])
def test_draws_captured_in_decode_graphs_equal_the_sampler(wide_models, backend):
    """Decode steps draw inside their CUDA graphs (lmq.static_sampling): greedy, seeded and (on
    turbomind, whose race keys every row from the engine's generator) unseeded draws with top-k,
    top-p and min-p, with logprobs, equal the sampler's draws over the same graphs' logits."""
    prompts = random_prompts(12, [5, 40, 130, 17], seed=6)
    base = SamplingParams(max_tokens=40, ignore_eos=True)
    seeded = backend == "pytorch"  # its sampler draws unseeded rows by a generator, not by keys
    params = [replace(base, temperature=0.0, logprobs=2), replace(base, temperature=0.0),
              *[replace(base, temperature=0.7 + 0.1 * i, top_k=[0, 20, 50][i % 3], top_p=[1.0, 0.9][i % 2],
                        min_p=[0.0, 0.05][i // 5], seed=100 + i if seeded or i % 2 else None,
                        logprobs=1 if i % 4 == 0 else None)
                for i in range(10)]]
    outs, modes = [], []
    for fused in (True, False):
        llm = LLM(str(wide_models["llama"]), device="cuda", dtype="float32", backend=backend,
                  gpu_memory_utilization=0.2)
        runner = llm.engine.runner
        if not fused:
            runner.fuses_sampling = lambda step: False
        outs.append(llm.generate(prompts, params))
        modes.append({key[3] for key in runner.graphs.graphs})
        del llm, runner
        torch.cuda.empty_cache()
    assert any(m.random and m.top and m.min_p for m in modes[0]) and all(not m.random for m in modes[1])
    for a, b in zip(*outs, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs or [], y.logprobs or [], strict=True):
            assert lx.keys() == ly.keys() and all(abs(lx[t].logprob - ly[t].logprob) < 1e-5 for t in lx)


def test_float32_mixed_adapters_identical_to_peft(wide_models, tmp_path):
    """A batch mixing every adapter and the base model, graphs and eager: each request's tokens
    equal peft's float32 greedy with its adapter alone."""
    from lora_fixtures import SPECS, make_adapter, peft_greedy

    base = wide_models["llama"]
    adapters = {n: str(make_adapter(base, tmp_path / n, spec, i)) for i, (n, spec) in enumerate(SPECS.items())}
    prompts = random_prompts(4, [3, 40, 90], seed=400)
    names = [None, *adapters]
    expected = {n: peft_greedy(base, adapters.get(n), prompts, 16, torch.float32, "cuda") for n in names}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ps = [p for p in prompts for _ in names]
    ns = [n for _ in prompts for n in names]
    for opts in ({}, {"enforce_eager": True}):
        llm = LLM(str(base), device="cuda", dtype="float32", backend="turbomind", gpu_memory_utilization=0.2,
                  adapters=adapters, max_loras=len(adapters), **opts)
        got = [o.outputs[0].token_ids for o in llm.generate(ps, params, adapter=ns)]
        assert got == [expected[n][i] for i in range(len(prompts)) for n in names], opts
        del llm
        torch.cuda.empty_cache()


FED_RTOL = 0.10  # as tests/test_gpu_vlm.py: turbomind's bf16 error within 10% of transformers' bf16


def _hf_fed_logprobs(folder, dtype: torch.dtype, prompts: list[list[int]], fed: list[list[int]]) -> torch.Tensor:
    """Log-probs of the fed tokens under transformers in `dtype`, one forward pass per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).cuda().eval()
    out = []
    with torch.inference_mode():
        for p, f in zip(prompts, fed, strict=True):
            ids = torch.tensor([p + f], device="cuda")
            lp = model(ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)  # [len(f), V]
            out.append(lp.gather(1, torch.tensor(f, device="cuda")[:, None])[:, 0].cpu())
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_diverges_from_float32_no_sooner_than_transformers(wide_models, arch):
    """bf16 greedy on random weights is chaotic, so divergence is measured teacher-forced (see
    test_gpu_vlm.py): transformers' float32 greedy continuation fed to both bf16 runs, the mean
    |log-prob error| of each fed token against float32."""
    folder = wide_models[arch]
    prompts = random_prompts(24, [5, 33, 64, 150], seed=7)
    fed = hf_greedy(folder, prompts, 24, torch.float32, "cuda")
    lp32 = _hf_fed_logprobs(folder, torch.float32, prompts, fed)
    lp16 = _hf_fed_logprobs(folder, torch.bfloat16, prompts, fed)
    llm = LLM(str(folder), device="cuda", dtype="bfloat16", backend="turbomind", gpu_memory_utilization=0.2)
    ours = []
    for p, f in zip(prompts, fed, strict=True):
        out = llm.generate({"prompt_token_ids": p + f}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        ours += [row[t].logprob for row, t in zip(out.prompt_logprobs[-len(f):], f, strict=True)]
    e_hf = (lp16 - lp32).abs().mean().item()
    e_tm = (torch.tensor(ours) - lp32).abs().mean().item()
    print(f"{arch}: fed-token |dlogprob| vs float32: transformers bf16 {e_hf:.5f}, turbomind bf16 {e_tm:.5f}")
    assert e_tm <= e_hf * (1 + FED_RTOL), (e_tm, e_hf)


@pytest.fixture(scope="module")
def wide_awq(wide_models, tmp_path_factory) -> str:
    """The wide llama quantized by lmq awq (on the CPU, a few calibration samples)."""
    from quant_tools.awq import AWQConfig, quantize_checkpoint
    from quant_tools.wikitext import split

    config = AWQConfig(group_size=64, calib_samples=8, calib_seqlen=64)
    return str(quantize_checkpoint(str(wide_models["llama"]), str(tmp_path_factory.mktemp("wide-awq") / "q"), config,
                                   split(held_out=False)[:6]))


def _prompt_logprobs(llm: LLM, prompts: list[list[int]], k: int = 0) -> list[list[dict]]:
    """Per prompt, the log-prob rows of its tokens after the first (top k and the prompt's own)."""
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, prompt_logprobs=k),
                       use_tqdm=False)
    return [o.prompt_logprobs[1:] for o in out]


def _own(rows: list[list[dict]], prompts: list[list[int]]) -> torch.Tensor:
    """The prompts' own tokens' log-probs, flat."""
    return torch.tensor([row[t].logprob for r, p in zip(rows, prompts, strict=True)
                         for row, t in zip(r, p[1:], strict=True)])


@pytest.mark.parametrize("mma", [False, True])
def test_awq_model_scores_prompts_as_torch_engine(wide_awq, monkeypatch, mma):
    """An AWQ checkpoint on turbomind (AutoAWQ's layout with awq_gemv / awq_gemm, or with
    AWQ_MMA its repacked layout and awq_mma, in the prefill and in the decode graphs) against
    torch_engine on the same checkpoint: float16 prompt log-probs within
    0.1 of torch_engine's float16 (both round each (q - z) * s to float16 and accumulate in
    float32); each token turbomind's float16 greedy decode picks is within 0.1 of the best
    log-prob torch_engine's float16 gives at its position; in bfloat16, no further from
    torch_engine's float32 than torch_engine's own bfloat16 is (within FED_RTOL)."""
    from turbomind import ops

    monkeypatch.setattr(ops, "AWQ_MMA", mma)
    prompts = random_prompts(8, [5, 40, 130, 300], seed=11)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(device="cuda", gpu_memory_utilization=0.2)
    own, decoded = {}, None
    for backend, dtype in (("turbomind", "float16"), ("pytorch", "float16"), ("pytorch", "float32"),
                           ("pytorch", "bfloat16"), ("turbomind", "bfloat16")):
        llm = LLM(wide_awq, backend=backend, dtype=dtype, **kw)
        assert llm.engine.config.backend == backend
        qweight = llm.engine.runner.model.layers[0].down_proj.qweight  # [in / 16, 2 out] once repacked
        assert (qweight.shape[0] == WIDE["intermediate_size"] // 16) == (mma and backend == "turbomind")
        own[backend, dtype] = _own(_prompt_logprobs(llm, prompts), prompts)
        if (backend, dtype) == ("turbomind", "float16"):
            decoded = [p + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, greedy,
                                                                                       use_tqdm=False))]
        if (backend, dtype) == ("pytorch", "float16"):
            for p, d, rows in zip(prompts, decoded, _prompt_logprobs(llm, decoded, k=1), strict=True):
                for row, t in zip(rows[len(p) - 1:], d[len(p):], strict=True):  # row j scores d[j + 1]
                    assert row[t].logprob >= max(v.logprob for v in row.values()) - 0.1
        del llm
        torch.cuda.empty_cache()
    assert (own["turbomind", "float16"] - own["pytorch", "float16"]).abs().max().item() < 0.1
    lp32 = own["pytorch", "float32"]
    e_te = (own["pytorch", "bfloat16"] - lp32).abs().mean().item()
    e_tm = (own["turbomind", "bfloat16"] - lp32).abs().mean().item()
    print(f"AWQ prompt |dlogprob| vs torch_engine float32: torch_engine bf16 {e_te:.5f}, turbomind bf16 {e_tm:.5f}")
    assert e_tm <= e_te * (1 + FED_RTOL), (e_tm, e_te)
