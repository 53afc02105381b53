"""AsyncEngine with the engine core in its own process: deltas rebuild the engine's outputs
exactly, calls, extra add_request arguments, start-up errors, a dying engine process, shutdown."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from dataclasses import replace

import pytest

from conftest import PROMPTS, held_after, plain_piece, random_prompts, wait_for
from lmq import LLM, SamplingParams
from lmq.async_engine import AsyncEngine, EngineDeadError
from lmq.deltas import DeltaEncoder, OutputAssembler
from lmq.engine import EngineStats
from lmq.llm import build_engine_config
from lmq.sequence import CompletionOutput, RequestOutput


def _config(folder, **opts):
    return build_engine_config(str(folder), device="cpu", **{"kv_cache_gb": 0.05, "max_model_len": 512, **opts})


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.05, max_model_len=512, block_size=8)


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = AsyncEngine(_config(tiny_models["llama"], block_size=8))
    yield eng
    eng.shutdown()


def _stop_string(llm: LLM) -> tuple[list[int], str]:
    """A prompt and a plain piece of its greedy output, to stop on."""
    for text in PROMPTS:
        ids = llm.tokenizer.encode(text)
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
        if stop := plain_piece(out, 2):
            return ids, stop
    raise AssertionError("no output with two plain characters")


# -- deltas, in one process --------------------------------------------------------------------
def test_deltas_rebuild_every_output_exactly(llm):
    """Every snapshot the engine builds goes child-side encode -> pickle -> parent-side apply,
    and comes out equal, field for field (arrival_time is the front end's own)."""
    prompt, stop = _stop_string(llm)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    cases = {
        "plain": (prompt, greedy, True),
        "stop": (prompt, replace(greedy, stop=(stop, "\x00never")), True),
        "stop-kept": (prompt, replace(greedy, stop=(stop,), include_stop_str_in_output=True), True),
        "n2-logprobs": (random_prompts(1, [9], seed=3)[0],
                        SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, logprobs=2, prompt_logprobs=1),
                        True),
        "whole": (random_prompts(1, [20], seed=4)[0], replace(greedy, logprobs=0), False),
        "aborted": (random_prompts(1, [6], seed=5)[0], replace(greedy, max_tokens=100), True),
    }
    eng, encoder = llm.engine, DeltaEncoder()
    assemblers = {rid: OutputAssembler(rid, None, list(p), sp, 0.0) for rid, (p, sp, _) in cases.items()}
    for rid, (p, sp, stream) in cases.items():
        eng.add_request(rid, p, sp, stream=stream)
    seen: dict[str, int] = dict.fromkeys(cases, 0)
    for step in range(200):
        outs = eng.step()
        if step == 5:
            outs.append(eng.abort("aborted"))
        for out in outs:
            delta = pickle.loads(pickle.dumps(encoder.encode(out)))
            rebuilt = assemblers[out.request_id].apply(delta)
            assert replace(rebuilt, arrival_time=out.arrival_time) == out, out.request_id
            seen[out.request_id] += 1
        if not eng.has_unfinished():
            break
    assert not eng.has_unfinished() and seen["whole"] == 1 and all(seen.values())
    assert not encoder._sent  # nothing left behind for finished requests


def test_deltas_when_the_final_text_does_not_extend_what_was_shown():
    params = SamplingParams(max_tokens=8)
    encoder, assembler = DeltaEncoder(), OutputAssembler("r", None, [5], params, 0.0)

    def out(text: str, ids: list[int], finish: str | None) -> RequestOutput:
        return RequestOutput("r", None, [5], [CompletionOutput(0, text, ids, finish)], finish is not None)

    for snapshot in (out("abc", [1], None), out("abcdef", [1, 2], None), out("abXY", [1, 2, 3], "stop")):
        assert assembler.apply(encoder.encode(snapshot)) == snapshot


# -- the engine process ------------------------------------------------------------------------
async def _collect(eng: AsyncEngine, rid: str, prompt, params: SamplingParams, **extra) -> list[RequestOutput]:
    return [out async for out in eng.add_request(rid, prompt, params, **extra)]


def test_outputs_match_the_offline_engine(engine, llm):
    prompt, stop = _stop_string(llm)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,)),
              SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)]
    refs = llm.generate([prompt] * len(params), params)

    async def run() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(_collect(engine, f"m{i}", prompt, p) for i, p in enumerate(params)))

    for outs, ref in zip(asyncio.run(run()), refs):
        last = outs[-1]
        assert last.finished and [o.finished for o in outs[:-1]] == [False] * (len(outs) - 1)
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in last.outputs] == \
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in ref.outputs]
        assert last.prompt_token_ids == prompt and last.first_token_time >= last.arrival_time
        assert (last.prompt_logprobs is None) == (ref.prompt_logprobs is None)
    assert outs[-1].prompt_logprobs is not None and len(outs[-1].prompt_logprobs) == len(prompt)


def test_config_tokenizer_and_stats(engine, llm):
    assert engine.config.cache.num_kv_blocks > 0 and engine.config.cache.block_size == 8
    assert engine.tokenizer.encode("Hello there") == llm.tokenizer.encode("Hello there")
    s = engine.stats()
    assert isinstance(s, EngineStats) and s.num_blocks == engine.config.cache.num_kv_blocks


def test_call_returns_results_and_raises_the_engine_errors(engine):
    async def run() -> None:
        stats = await engine.call("stats")
        assert isinstance(stats, EngineStats) and stats.num_free_blocks == stats.num_blocks
        assert await engine.call("block_manager.check_integrity") is None
        with pytest.raises(ValueError, match="prompt is empty"):
            await engine.call("add_request", "x", [], SamplingParams())
        with pytest.raises(AttributeError):
            await engine.call("no_such_method")
        with pytest.raises(TypeError, match="cannot be sent"):
            await engine.call("requests.values")  # a dict view does not pickle

    asyncio.run(run())
    assert engine.call_blocking("has_unfinished", timeout=30) is False


def test_extra_arguments_reach_llm_engine_add_request(engine):
    with pytest.raises(TypeError, match="no_such_option"):
        asyncio.run(_collect(engine, "x0", [5, 6, 7], SamplingParams(max_tokens=2), no_such_option=1))
    with pytest.raises(TypeError, match="cannot send this to the engine process"):
        asyncio.run(_collect(engine, "x0", [5, 6, 7], SamplingParams(max_tokens=2), adapter=lambda: 0))
    ok = asyncio.run(_collect(engine, "x1", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True)))
    assert len(ok[-1].outputs[0].token_ids) == 2


def test_validation_and_queue_checks_are_synchronous(engine):
    async def run() -> None:
        with pytest.raises(ValueError, match="max_model_len=512"):
            engine.add_request("v0", [5] * 510, SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match="out of range"):
            engine.add_request("v1", [5, 10**6], SamplingParams())
        before = engine.stats().num_aborted
        with held_after(engine, 2):
            s = engine.add_request("v2", [5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
            with pytest.raises(ValueError, match="already in use"):
                engine.add_request("v2", [5, 6], SamplingParams())
            async for out in s:
                assert not out.finished
                break  # leaving the stream aborts the request
            await asyncio.to_thread(wait_for, lambda: engine.stats().num_aborted == before + 1, "the abort")

    asyncio.run(run())
    wait_for(lambda: engine.stats().num_running == 0, "the aborted request leaves")
    s = engine.stats()
    assert s.num_running == 0 and s.num_free_blocks == s.num_blocks


def test_a_failed_step_fails_only_the_requests_in_flight(engine):
    engine.set_debug_hooks(fail_steps=1)
    with pytest.raises(RuntimeError, match="injected step failure"):
        asyncio.run(_collect(engine, "f0", [5, 6, 7], SamplingParams(max_tokens=4)))
    ok = asyncio.run(_collect(engine, "f1", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True)))
    assert ok[-1].outputs[0].finish_reason == "length" and engine.alive


def test_start_up_error_is_raised_in_the_caller(tiny_models):
    with pytest.raises(ValueError, match="backend='turbomind' cannot serve this model: it runs on CUDA GPUs only"):
        AsyncEngine(replace(_config(tiny_models["llama"]), backend="turbomind"))


def test_engine_process_death_fails_streams_calls_and_new_requests(tiny_models):
    eng = AsyncEngine(_config(tiny_models["llama"]))
    eng.set_debug_hooks(pause_after=2)  # d0 is still running when it is killed

    async def run() -> None:
        stream = eng.add_request("d0", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        with pytest.raises(EngineDeadError):
            killed = False
            async for out in stream:
                assert not out.finished
                if not killed:  # running (and held): kill it
                    os.kill(eng.process.pid, signal.SIGKILL)
                    killed = True
        with pytest.raises(EngineDeadError):
            eng.add_request("d1", [5], SamplingParams())
        with pytest.raises(EngineDeadError):
            await eng.call("stats")

    asyncio.run(run())
    assert not eng.alive
    wait_for(lambda: eng.process.exitcode is not None, "the killed process is reaped (no zombie)", 10)
    assert eng.process.exitcode == -signal.SIGKILL
    t = time.monotonic()
    eng.shutdown()
    assert time.monotonic() - t < 10 and eng.process.exitcode == -signal.SIGKILL


def test_shutdown_aborts_running_streams_and_the_process_exits(tiny_models):
    eng = AsyncEngine(_config(tiny_models["llama"]))
    eng.set_debug_hooks(pause_after=2)  # s0 is still running when the shutdown comes

    async def run() -> RequestOutput:
        stream = eng.add_request("s0", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))
        last = None
        async for out in stream:
            if last is None:
                await asyncio.to_thread(eng.shutdown)
            last = out
        return last

    last = asyncio.run(run())
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert eng.process.exitcode == 0 and not eng.alive
    with pytest.raises(EngineDeadError):
        eng.call_blocking("stats")
