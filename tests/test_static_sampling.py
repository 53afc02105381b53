"""The draw a runner captures with its decode step (lmq.static_sampling): the same tokens as the
sampler's host-driven launch, row for row, on fresh random logits; and an engine whose decode
steps draw inside DecodeGraphs (run uncaptured on the CPU) gives the outputs of one without."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import SEED, assert_same_outputs, random_prompts
from lmq import LLM, SamplingParams
from lmq.block_manager import blocks_for
from lmq.sampling import Sampler, SamplerRow, counter_race, step_seed
from lmq.static_sampling import sample_static
from lmq.step_input import GREEDY, SamplingMode
from torch_engine.cuda_graph import DecodeGraphs

VOCAB = 1000


def _random_params(rng: random.Random, seeded: bool) -> SamplingParams:
    kind = rng.choice(["greedy", "plain", "top_k", "top_p", "min_p", "all"])
    if kind == "greedy":
        return SamplingParams(temperature=0.0)
    kw = dict(temperature=rng.uniform(0.3, 1.5), seed=rng.randrange(2**31) if seeded else None)
    if kind in ("top_k", "all"):
        kw["top_k"] = rng.choice([1, 5, 50, VOCAB, 2 * VOCAB])
    if kind in ("top_p", "all"):
        kw["top_p"] = rng.uniform(0.5, 0.99)
    if kind in ("min_p", "all"):
        kw["min_p"] = rng.uniform(0.01, 0.3)
    return SamplingParams(**kw)


def _rows(rng: random.Random, n: int, seeded: bool) -> list[SamplerRow]:
    rows = []
    for _ in range(n):
        p = _random_params(rng, seeded or rng.random() < 0.5)
        seed = None if p.seed is None else step_seed(p.seed, rng.randrange(100))
        rows.append(SamplerRow(p, [], [], seed=seed))
    return rows


def _static(rows: list[SamplerRow], logits: torch.Tensor, race, generator_seed: int) -> torch.Tensor:
    sampler = Sampler(torch.Generator().manual_seed(generator_seed), race=race)
    sampling = sampler.step_sampling(rows, logits.shape[1], logits.device)
    assert sampling is not None
    return sample_static(logits, sampling, race)


@pytest.mark.parametrize("trial", range(4))
def test_static_draw_equals_the_sampler_with_a_backend_race(trial):
    """With a backend race (here the torch one) every row is keyed, unseeded rows from the
    engine's generator: both paths draw the same keys, so every token is equal."""
    rng = random.Random(SEED + trial)
    logits = 3 * torch.randn(48, VOCAB, generator=torch.Generator().manual_seed(SEED + trial))
    rows = _rows(rng, 48, seeded=False)
    eager = Sampler(torch.Generator().manual_seed(trial), race=counter_race).launch(logits, rows).tokens
    assert torch.equal(_static(rows, logits, counter_race, trial), eager)


@pytest.mark.parametrize("trial", range(4))
def test_static_draw_equals_the_sampler_on_seeded_rows(trial):
    """Without a backend race the sampler draws seeded rows by counter_exponentials, as the
    static draw does: the same tokens (unseeded rows draw differently: not compared)."""
    rng = random.Random(SEED + 100 + trial)
    logits = 3 * torch.randn(40, VOCAB, generator=torch.Generator().manual_seed(SEED + 100 + trial))
    rows = _rows(rng, 40, seeded=True)
    eager = Sampler(torch.Generator().manual_seed(0)).launch(logits, rows).tokens
    assert torch.equal(_static(rows, logits, None, 0), eager)
    assert len(set(eager.tolist())) > 10  # the rows drew different tokens: the draw is not degenerate


def test_modes_follow_the_drawing_rows():
    sampler = Sampler(torch.Generator().manual_seed(0))

    def mode(*params: SamplingParams) -> SamplingMode:
        return sampler.step_sampling([SamplerRow(p, [], []) for p in params], VOCAB, torch.device("cpu")).mode

    greedy = SamplingParams(temperature=0.0)
    assert mode(greedy, greedy) == GREEDY
    # A greedy row's top_k / min_p never select the filters: only drawing rows do.
    assert mode(SamplingParams(temperature=0.0, top_k=5, min_p=0.5), SamplingParams()) == SamplingMode(random=True)
    assert mode(greedy, SamplingParams(top_k=5)) == SamplingMode(random=True, top=True)
    assert mode(SamplingParams(top_k=VOCAB), SamplingParams(top_p=0.9)) == SamplingMode(random=True, top=True)
    assert mode(SamplingParams(top_k=VOCAB + 1)) == SamplingMode(random=True)
    assert mode(SamplingParams(min_p=0.1)) == SamplingMode(random=True, min_p=True)


@pytest.mark.parametrize("params, banned", [
    (SamplingParams(repetition_penalty=1.3), []),
    (SamplingParams(presence_penalty=0.5), []),
    (SamplingParams(logit_bias={3: 2.0}), []),
    (SamplingParams(allowed_token_ids=[1, 2, 3]), []),
    (SamplingParams(), [7]),
])
def test_rows_that_need_more_than_the_logits_stay_with_the_sampler(params, banned):
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = [SamplerRow(SamplingParams(), [], []), SamplerRow(params, [1, 2], [3], banned=banned)]
    assert sampler.step_sampling(rows, VOCAB, torch.device("cpu")) is None
    generator_row = SamplerRow(SamplingParams(), [], [], generator=torch.Generator().manual_seed(1))
    assert sampler.step_sampling([generator_row], VOCAB, torch.device("cpu")) is None


OPTS = dict(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=64, max_model_len=256,
            num_kv_blocks=200, max_num_seqs=8)


def _with_graphs(folder, **kw) -> LLM:
    """An engine whose decode steps run through DecodeGraphs without capture (the CPU's stand-in
    for CUDA graphs: the same static buffers, padding and captured draw)."""
    llm = LLM(str(folder), **OPTS, **kw)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner, llm.engine.config.scheduler.max_num_seqs,
                                 blocks_for(llm.engine.config.model.max_model_len, runner.block_size), capture=False)
    return llm


def _params(rng: random.Random, n: int) -> list[SamplingParams]:
    """Greedy and seeded draws (unseeded ones are drawn differently without a backend race),
    some with logprobs, the last with a penalty (its steps are sampled by the sampler)."""
    out = []
    for i in range(n):
        p = _random_params(rng, seeded=True)
        extra = dict(max_tokens=rng.randrange(5, 20), ignore_eos=True)
        if i % 3 == 0:
            extra["logprobs"] = 2
        if i == n - 1:  # ends first: later steps draw inside the graphs
            extra.update(repetition_penalty=1.2, max_tokens=3)
        out.append(SamplingParams(**{**p.__dict__, **extra}))
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_drawing_inside_decode_graphs_equals_the_sampler(tiny_models, async_scheduling):
    rng = random.Random(SEED + int(async_scheduling))
    prompts = random_prompts(7, [5, 9, 17, 30], seed=300 + int(async_scheduling))
    params = _params(rng, 7)
    plain = LLM(str(tiny_models["llama"]), async_scheduling=async_scheduling, **OPTS)
    graphs = _with_graphs(tiny_models["llama"], async_scheduling=async_scheduling)
    assert_same_outputs(graphs.generate([{"prompt_token_ids": p} for p in prompts], params),
          plain.generate([{"prompt_token_ids": p} for p in prompts], params))
    g = graphs.engine.runner.graphs
    assert g.replays > 0
    # Steps with the penalty row replayed the greedy graph; the others drew in theirs.
    assert any(mode == GREEDY for *_, mode in g.graphs) and any(mode.random for *_, mode in g.graphs)
    # Without the penalty row, every decode step draws inside (none is sampled by the sampler).
    launches = []
    launch = graphs.engine.sampler.launch
    graphs.engine.sampler.launch = lambda *a: launches.append(1) or launch(*a)
    outs = graphs.generate([{"prompt_token_ids": p} for p in prompts[:6]], params[:6])
    assert_same_outputs(outs, plain.generate([{"prompt_token_ids": p} for p in prompts[:6]], params[:6]))
    assert 0 < len(launches) < max(len(o.outputs[0].token_ids) for o in outs)  # the prefills' draws only
