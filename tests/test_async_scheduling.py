"""Async scheduling (vLLM's --async-scheduling): step n+1 is scheduled and launched before step n
is read back, its input token read on the device from step n's samples. The outputs are those
of the synchronous engine, token for token, through stops, aborts, preemption and the paths
that must stay synchronous (grammars, penalties, forks)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest
from schema_fixtures import random_schema, value_end_bias

from conftest import PROMPTS, SEED, assert_same_outputs, plain_piece, random_prompts, wait_for
from lmq import LLM, SamplingParams
from lmq.async_engine import AsyncEngine
from lmq.llm import build_engine_config
from lmq.sequence import Sequence
from lmq.structured import GuidedDecodingParams

OPTS = dict(device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=64, max_model_len=256)


def _pair(folder, **kw) -> tuple[LLM, LLM]:
    return LLM(str(folder), **OPTS, **kw), LLM(str(folder), async_scheduling=True, **OPTS, **kw)


@contextlib.contextmanager
def _builds(llm: LLM) -> Iterator[list[list[tuple[Sequence, bool]]]]:
    """Per step built inside the block: each scheduled sequence and whether its input token is
    read from the step in flight."""
    builds: list[list[tuple[Sequence, bool]]] = []
    build = llm.engine.builder.build

    def spy(batch, pending=None):
        builds.append([(s.seq, s.seq.num_pending > 0) for s in batch.seqs])
        return build(batch, pending)

    llm.engine.builder.build = spy
    try:
        yield builds
    finally:
        llm.engine.builder.build = build


def _gathers(builds: list[list[tuple[Sequence, bool]]]) -> int:
    return sum(read for step in builds for _, read in step)


def _idle(llm: LLM) -> None:
    eng = llm.engine
    eng.block_manager.check_integrity()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.scheduler.running and not eng.scheduler.waiting and not eng.has_unfinished()


@pytest.fixture(scope="module")
def pair(tiny_models) -> tuple[LLM, LLM]:
    return _pair(tiny_models["llama"], num_kv_blocks=200)


def test_outputs_equal_the_synchronous_engine(pair):
    """Greedy and seeded sampling, stop tokens and stop strings hit while the next step is in
    flight, logprobs, max_tokens 1, chunked prefills joining decodes: the same outputs."""
    sync, fast = pair
    prompts = random_prompts(10, [5, 70, 12, 130, 9, 33], seed=51)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    free = sync.generate(prompts, greedy)
    rng = random.Random(SEED)
    params = []
    for i, out in enumerate(free):
        ids, text = out.outputs[0].token_ids, out.outputs[0].text
        kind = i % 5
        if kind == 0:  # a stop token from the middle of the greedy output
            params.append(replace(greedy, stop_token_ids=(ids[rng.randrange(3, 20)],)))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=rng.randrange(1000), max_tokens=25,
                                         ignore_eos=True, logprobs=2))
        elif kind == 2 and (piece := plain_piece(text[len(text) // 3:], 2)):
            params.append(replace(greedy, stop=(piece,)))
        elif kind == 3:
            params.append(replace(greedy, max_tokens=1 + i % 2))
        else:
            params.append(replace(greedy, max_tokens=17, logprobs=1))
    with _builds(fast) as builds:
        assert_same_outputs(sync.generate(prompts, params), fast.generate(prompts, params))
    assert _gathers(builds) > 50  # the async path ran: most decodes read their token on the device
    fast.engine.step()  # the step launched after the last request ended computes nothing kept
    _idle(sync), _idle(fast)


def _sync_only(kind: str, llm: LLM, prompt: list[int]) -> SamplingParams:
    base = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    if kind == "penalties":
        return replace(base, repetition_penalty=1.3, presence_penalty=0.5)
    if kind == "min_tokens":
        return replace(base, min_tokens=10, stop_token_ids=(prompt[0],), ignore_eos=False)
    if kind == "bad_words":  # a word of its own greedy output, so the ban bites
        text = llm.generate(prompt, base, use_tqdm=False)[0].outputs[0].text
        words = [w for w in (plain_piece(text, 2), *(llm.tokenizer.decode([t]) for t in range(3, 300))) if w]
        return replace(base, bad_words=[next(w for w in words if w.strip() and w.isascii() and w.isprintable())])
    return SamplingParams(temperature=1.0, seed=9, max_tokens=200, logit_bias=value_end_bias(llm.tokenizer.encode),
                          guided_decoding=GuidedDecodingParams(json=random_schema(random.Random(SEED))))


@pytest.mark.parametrize("kind", ["penalties", "min_tokens", "bad_words", "grammar"])
def test_a_request_that_reads_its_tokens_on_the_host_keeps_steps_synchronous(pair, kind):
    """Penalties, min_tokens, bad words and a grammar read the output so far before each step:
    no step with such a request in it reads a token from the step in flight, and everyone's
    outputs stay those of the synchronous engine (the plain requests pend once it is done)."""
    sync, fast = pair
    prompts = random_prompts(4, [8, 40, 15], seed=52)
    base = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    # The third outlives the first (a grammar's up to 200 tokens), so it pends once that is done.
    params = [_sync_only(kind, sync, prompts[0]), base, replace(base, max_tokens=230), replace(base, logprobs=2)]
    with _builds(fast) as steps:
        assert_same_outputs(sync.generate(prompts, params), fast.generate(prompts, params))
    # (the request is in the step, a token is read from the step in flight), per step
    builds = [(any(seq.prompt_token_ids == prompts[0] for seq, _ in step), any(r for _, r in step)) for step in steps]
    assert any(held for held, _ in builds) and not any(held and read for held, read in builds)
    assert any(read for held, read in builds if not held)  # the others pend once it is done
    fast.engine.step()
    _idle(sync), _idle(fast)


@pytest.mark.parametrize("kind", ["fork", "prompt_logprobs"])
def test_forks_and_prompt_logprobs_match(pair, kind):
    """The step that forks n samples, or reads prompt logprobs back, is finished before the next."""
    sync, fast = pair
    prompts = random_prompts(4, [8, 40, 15], seed=55)
    base = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    first = SamplingParams(temperature=0.8, seed=5, n=3, max_tokens=12, ignore_eos=True) if kind == "fork" else \
        replace(base, prompt_logprobs=2, logprobs=1)
    params = [first, base, replace(base, max_tokens=33), base]
    a, b = sync.generate(prompts, params), fast.generate(prompts, params)
    assert_same_outputs(a, b)
    if kind == "prompt_logprobs":
        for x, y in zip(a[0].prompt_logprobs[1:], b[0].prompt_logprobs[1:], strict=True):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    fast.engine.step()
    _idle(sync), _idle(fast)


def test_preemption_and_prefix_cache_hits_while_tokens_are_pending(tiny_models):
    """A cache too small for the batch preempts sequences that have a token in flight; a repeated
    prompt is served from the prefix cache. Outputs and hit counts match the synchronous engine."""
    sync, fast = _pair(tiny_models["llama"], num_kv_blocks=40)
    prompts = random_prompts(8, [30, 45, 20], seed=53)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with _builds(fast) as builds:
        assert_same_outputs(sync.generate(prompts, params), fast.generate(prompts, params))
    assert fast.engine.scheduler.num_preemptions > 0 and _gathers(builds) > 0
    first = [llm.generate(prompts[:3], params) for llm in (sync, fast)]  # 3 fit: nothing is evicted
    assert_same_outputs(*first)
    again = [p + o.outputs[0].token_ids[:16] for p, o in zip(prompts[:3], first[0])]
    before = [llm.engine.block_manager.prefix_hits for llm in (sync, fast)]
    assert_same_outputs(sync.generate(again, params), fast.generate(again, params))
    hits = [llm.engine.block_manager.prefix_hits - b for llm, b in zip((sync, fast), before)]
    assert hits[0] == hits[1] > 0
    fast.engine.step()
    _idle(sync), _idle(fast)


def test_abort_with_a_token_in_flight_frees_everything(pair):
    sync, fast = pair
    eng = fast.engine
    prompts = random_prompts(4, [12, 50, 7], seed=54)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = sync.generate(prompts, params)
    for i, p in enumerate(prompts):
        eng.add_request(f"x{i}", p, params)
    outs = {}
    for _ in range(8):
        outs.update((o.request_id, o) for o in eng.step() if o.finished)
    assert any(s.request.request_id == "x1" for s in eng.in_flight.pended)  # x1's token is on the device
    aborted = eng.abort("x1").outputs[0]
    while eng.has_unfinished() or eng.in_flight is not None:
        outs.update((o.request_id, o) for o in eng.step() if o.finished)
    assert aborted.finish_reason == "abort"
    assert aborted.token_ids == expected[1].outputs[0].token_ids[:len(aborted.token_ids)]
    for i in (0, 2, 3):
        assert outs[f"x{i}"].outputs[0].token_ids == expected[i].outputs[0].token_ids
    _idle(fast)


def test_engine_process_with_async_scheduling(tiny_models, pair):
    """The engine core's own loop (the server's): the same outputs, an abort mid-stream, and
    every block back in the pool afterwards."""
    sync, _ = pair
    prompts = [sync.tokenizer.encode(t) for t in PROMPTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = sync.generate(prompts, params)
    engine = AsyncEngine(build_engine_config(str(tiny_models["llama"]), async_scheduling=True, **OPTS))

    async def one(i):
        return [out async for out in engine.add_request(f"s{i}", prompts[i], params)][-1]

    async def cut():
        outs = []
        async for out in engine.add_request("cut", prompts[0], replace(params, max_tokens=200)):
            outs.append(out)
            if len(out.outputs[0].token_ids) >= 5 and not out.finished:
                engine.abort("cut")
        return outs[-1]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)), cut())

    try:
        *outs, last = asyncio.run(main())
        for out, want in zip(outs, expected):
            assert out.outputs[0].token_ids == want.outputs[0].token_ids
        got = last.outputs[0]
        assert got.finish_reason == "abort" and 5 <= len(got.token_ids) < 200
        wait_for(lambda: engine.stats().num_running == 0 and engine.stats().num_free_blocks ==
                 engine.stats().num_blocks, "the engine is idle with every block free")
    finally:
        engine.shutdown()


def test_a_failed_launch_keeps_what_the_step_in_flight_sampled(tiny_models):
    """Step n + 1 launches before step n is read back. When that launch fails, step n's tokens
    are still appended first: a request step n finished ends as it would have, only those still
    running fail with the error, every block comes back, and the engine keeps serving."""
    engine = AsyncEngine(build_engine_config(str(tiny_models["llama"]), async_scheduling=True, **OPTS))
    params = SamplingParams(max_tokens=1, ignore_eos=True)

    async def last(stream):
        try:
            return [out async for out in stream][-1]
        except RuntimeError as e:
            return e

    async def main():
        engine.set_debug_hooks(pause_after=0)  # hold: both requests join the same first step
        streams = [engine.add_request("done", [5, 6, 7], params),
                   engine.add_request("long", [8, 9], replace(params, max_tokens=50))]
        engine.set_debug_hooks(fail_steps=1, fail_after=1)  # step 1 launches, step 2's launch fails
        return await asyncio.gather(*(last(s) for s in streams))

    try:
        done, long = asyncio.run(main())
        assert done.finished and done.outputs[0].finish_reason == "length" and len(done.outputs[0].token_ids) == 1
        assert isinstance(long, RuntimeError) and "injected step failure" in str(long)
        wait_for(lambda: engine.stats().num_running == 0 and engine.stats().num_free_blocks ==
                 engine.stats().num_blocks, "the engine is idle with every block free")
        async def again_():
            return await last(engine.add_request("again", [5, 6, 7], replace(params, max_tokens=4)))

        again = asyncio.run(again_())
        assert again.outputs[0].finish_reason == "length" and len(again.outputs[0].token_ids) == 4
    finally:
        engine.shutdown()
