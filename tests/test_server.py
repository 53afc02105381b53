"""The OpenAI-compatible server, for real: uvicorn on a free loopback port, driven by the
official `openai` client and plain HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import PROMPTS, held_after, plain_piece, random_prompts, wait_for
from lmq import LLM, SamplingParams
from lmq.llm import build_engine_config
from serve.server import BackgroundServer, make_app

MODEL = "tiny"
KEY = "sk-test-key"


def _start(folder, **opts) -> BackgroundServer:
    keys = opts.pop("api_keys", ())
    queue = opts.pop("max_queue_len", None)
    config = build_engine_config(str(folder), device="cpu", **{"kv_cache_gb": 0.05, **opts})
    return BackgroundServer(make_app(config, MODEL, keys, queue))


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = _start(tiny_models["llama"], block_size=8, max_model_len=512)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.05, max_model_len=512)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _engine(server):
    return server.app.state.router.base.engine


def _wait_idle(server, timeout: float = 10.0) -> None:
    """All KV blocks back in the pool and nothing running. The engine takes ops in order, so a
    call first makes it apply every add and abort sent before (an earlier test's request still
    in the pipe would otherwise start after this returns, and use up a test's held steps)."""
    def idle() -> bool:
        s = _engine(server).stats()
        return s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0

    _engine(server).call_blocking("block_manager.check_integrity", timeout=10)
    wait_for(idle, "engine idle: every KV block free, nothing running or waiting", timeout)
    _engine(server).call_blocking("block_manager.check_integrity", timeout=10)


def _ids(logprobs_tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


CHAT = [{"role": "user", "content": "The quick brown fox"}]
# A stream with a chunk for every token, also one that decodes to no text yet: a test that reads
# one chunk from a held engine gets it.
EVERY_TOKEN = {"stream": True, "logprobs": 0}


# -- endpoints ---------------------------------------------------------------------------------
def test_models_health_version_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.url + "/version").json()
    text = httpx.get(server.url + "/metrics").text
    for name in ("lmq_requests_total", "lmq_time_to_first_token_seconds", "lmq_time_per_output_token_seconds",
                 "lmq_e2e_request_latency_seconds", "lmq_num_requests_running", "lmq_num_requests_waiting",
                 "lmq_kv_cache_usage_ratio", "lmq_prefix_cache_hit_rate", "lmq_prompt_tokens_total",
                 "lmq_generation_tokens_total"):
        assert name in text


def test_chat_matches_offline_and_reports_usage(client, offline):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True, extra_body={"return_tokens_as_token_ids": True,
                                                                  "ignore_eos": True})
    ref = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    c = r.choices[0]
    assert _ids([t.token for t in c.logprobs.content]) == ref.outputs[0].token_ids
    assert c.message.content == ref.outputs[0].text and c.message.role == "assistant"
    assert c.finish_reason == "length" and r.object == "chat.completion" and r.model == MODEL
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completions_text_ids_and_batches(client, offline):
    prompts = random_prompts(2, [5, 9], seed=41)
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    refs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [c.index for c in r.choices] == [0, 1]
    for c, ref in zip(r.choices, refs):
        assert _ids(c.logprobs.tokens) == ref.outputs[0].token_ids and c.text == ref.outputs[0].text
        assert all(len(top) >= 2 for top in c.logprobs.top_logprobs)
    one = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3)
    assert one.object == "text_completion" and len(one.choices) == 1 and one.usage.completion_tokens <= 3


def test_n_stop_and_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=1.0, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=1.0, seed=5)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    other = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, temperature=1.0, seed=6)
    assert [c.message.content for c in other.choices] != [c.message.content for c in r.choices]
    # A random model emits many bytes that are no text: find an output with a plain character
    # past its start, and stop on it.
    for prompt in PROMPTS:
        text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        if stop := plain_piece(text, 1):
            break
    assert stop, "no output with a plain character"
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]


def test_streaming_chat_chunk_order_and_usage(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    assert finish[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks.index(finish[0]) == len(chunks) - 2


def test_streaming_with_openai_client(client, offline):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0].text


# -- errors ------------------------------------------------------------------------------------
def _post(server, path: str, body: object, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def _assert_error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


@pytest.mark.parametrize("body, words, param", [
    ({"model": MODEL, "messages": CHAT, "temperature": -1}, ["temperature=-1", "[0, 100]"], "temperature"),
    ({"model": MODEL, "messages": CHAT, "top_p": 0}, ["top_p=0", "(0, 1]"], "top_p"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, ["n=0", ">= 1"], "n"),
    ({"model": MODEL, "messages": CHAT, "top_logprobs": 3}, ["requires logprobs"], "top_logprobs"),
    ({"model": MODEL, "messages": CHAT, "seed": 2**64}, ["seed=18446744073709551616", "2^63"], "seed"),
    ({"model": MODEL, "messages": []}, ["messages"], "messages"),
    ({"model": MODEL}, ["messages", "Field required"], "messages"),
    ({"model": MODEL, "messages": "hi"}, ["messages"], "messages"),
    ({"messages": CHAT}, ["model"], "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     ["does not accept images", "messages[0].content[0] is an image"], "messages[0].content[0]"),
])
def test_chat_validation_is_400_in_openai_shape(server, body, words, param):
    err = _assert_error(_post(server, "/v1/chat/completions", body), 400, *words)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_non_json_body_and_unknown_model_and_context_length(server):
    _assert_error(httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10), 400)
    err = _assert_error(_post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "'nope'", MODEL)
    assert err["param"] == "model"
    err = _assert_error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [5] * 500, "max_tokens": 100}),
                        400, "500 tokens", "100", "600", "512")
    assert err["code"] == "context_length_exceeded"
    _assert_error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [5, 10**6]}), 400, "out of range")
    _assert_error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [10**12, 902], "echo": True}), 400,
                  "out of range")  # echo decodes the prompt: checked before (the fuzzer's 500)
    _wait_idle(server)


def test_api_keys_and_queue_full(tiny_models):
    srv = _start(tiny_models["llama"], api_keys=(KEY,), max_queue_len=1, max_num_seqs=1)
    try:
        body = {"model": MODEL, "prompt": "The quick brown", "max_tokens": 400, "ignore_eos": True, **EVERY_TOKEN}
        _assert_error(_post(srv, "/v1/completions", body), 401, "API key")
        _assert_error(_post(srv, "/v1/models", None, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/ping").status_code == 200 and httpx.get(srv.url + "/version").status_code == 200
        for path, tokenize_body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})):
            _assert_error(_post(srv, path, tokenize_body), 401, "API key")
        auth = {"Authorization": f"Bearer {KEY}"}
        assert _post(srv, "/tokenize", {"prompt": "x"}, headers=auth).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers=auth).status_code == 200
        with held_after(_engine(srv), 2), \
                httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=auth, timeout=60) as running:
            lines = running.iter_lines()  # kept alive: dropping the iterator closes the stream
            next(lines)  # running, and held there: it keeps the only sequence slot
            waiting = threading.Thread(target=_post, args=(srv, "/v1/completions", {**body, "stream": False}),
                                       kwargs={"headers": auth})
            waiting.start()
            wait_for(lambda: _engine(srv).stats().num_waiting == 1, "the second request waits in the queue")
            full = _post(srv, "/v1/completions", body, headers=auth)
            err = _assert_error(full, 429, "queue is full", "max_queue_len=1")
            assert full.headers["Retry-After"] == "1" and err["type"] == "rate_limit_error"
            srv.stop()  # aborts the waiting request: its client gets an answer, nothing hangs
        waiting.join(30)
        assert not waiting.is_alive()
    finally:
        srv.stop()


# -- disconnects and load ----------------------------------------------------------------------
def _assert_aborted_and_freed(server, aborted_before: int) -> None:
    """The request was aborted and its blocks are back, while the engine still holds it: it
    cannot have finished on its own."""
    engine = _engine(server)
    wait_for(lambda: engine.stats().num_aborted == aborted_before + 1, "the server aborts the request")
    s = engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks, s
    engine.call_blocking("block_manager.check_integrity", timeout=10)


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 400, "ignore_eos": True, **EVERY_TOKEN}
    _wait_idle(server)  # an earlier test's request still finishing would be held too, and counted running
    before = _engine(server).stats().num_aborted
    with held_after(_engine(server), 3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
            first = next(resp.iter_lines())
            # stats() is the snapshot of the engine's last published step, which may reach this
            # process after that step's first token: wait for it (the held request stays running)
            try:
                wait_for(lambda: _engine(server).stats().num_running == 1, "the streaming request counts as running")
            except AssertionError as e:  # what the engine holds instead, for whoever reads the failure
                raise AssertionError(f"{e}; engine stats {_engine(server).stats()}, first line {first!r}") from None
        _assert_aborted_and_freed(server, before)
    _wait_idle(server)


def test_disconnect_while_waiting_for_a_whole_response_frees_blocks(server):
    body = json.dumps({"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 450, "ignore_eos": True})
    host, port = server.url.removeprefix("http://").split(":")
    _wait_idle(server)  # (as above)
    before = _engine(server).stats().num_aborted
    with held_after(_engine(server), 3):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            wait_for(lambda: _engine(server).stats().num_running == 1, "the request runs, then is held")
        _assert_aborted_and_freed(server, before)  # the client hung up without reading a byte
    _wait_idle(server)


def test_100_concurrent_streams_match_offline_greedy(server, offline):
    prompts = random_prompts(100, [3, 17, 40, 90], seed=42)
    refs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(p: list[int]) -> list[int]:
        stream = await aclient.completions.create(
            model=MODEL, prompt=p, max_tokens=12, temperature=0, stream=True, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        toks = []
        async for ch in stream:
            for c in ch.choices:
                if c.logprobs:
                    toks += _ids(c.logprobs.tokens)
        return toks

    async def all_of_them() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of_them())
    assert got == [r.outputs[0].token_ids for r in refs]
    _wait_idle(server)


# `lmq serve` whose engine holds every request after 4 steps: the stream is still running when
# the signal comes, on any machine.
HELD_SERVE = """
import sys
from lmq import async_engine, cli
init = async_engine.AsyncEngine.__init__
def held(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.set_debug_hooks(pause_after=4)
async_engine.AsyncEngine.__init__ = held
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_lmq_serve_prints_url_and_aborts_streams_on_signal(tiny_models, sig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", HELD_SERVE, "serve", str(tiny_models["llama"]), "--port", str(port),
                             "--device", "cpu", "--served-model-name", MODEL, "--kv-cache-gb", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 1000, "ignore_eos": True, **EVERY_TOKEN}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            next(lines)
            proc.send_signal(sig)
            events = [x[6:] for x in lines if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_engine_loop_survives_a_failed_step(server, client):
    _engine(server).set_debug_hooks(fail_steps=1)  # the next step raises, in the engine process
    try:
        broken = _post(server, "/v1/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 4})
        _assert_error(broken, 500, "internal error")
        ok = client.completions.create(model=MODEL, prompt="The quick", max_tokens=4)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        _engine(server).set_debug_hooks()
    _wait_idle(server)


def test_engine_process_death_is_503_and_unhealthy(tiny_models):
    srv = _start(tiny_models["llama"])
    try:
        engine = _engine(srv)
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 400, "ignore_eos": True, **EVERY_TOKEN}
        with held_after(engine, 2), httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            next(lines)
            engine.process.kill()
            with pytest.raises(httpx.RemoteProtocolError):  # the stream breaks off: no [DONE]
                for _ in lines:
                    pass
        _assert_error(httpx.get(srv.url + "/health", timeout=10), 503, "engine process has stopped")
        _assert_error(_post(srv, "/v1/completions", {"model": MODEL, "prompt": "x"}), 503, "stopped")
    finally:
        srv.stop()


def test_serving_takes_start_up_objects_out_of_the_collector():
    """`lmq serve` freezes what start-up built: a full collection then walks only per-request
    objects instead of stalling every stream for hundreds of milliseconds."""
    import gc

    from serve.server import freeze_startup_objects

    before = gc.get_freeze_count()
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
