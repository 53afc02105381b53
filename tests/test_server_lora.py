"""Adapters through the server: `model` picks the adapter, the tokens equal the offline API's,
runtime load/unload with --lora-dir, and the errors (404 unknown, 403 outside the folder, 400
broken)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import held_after, random_prompts
from lmq import LLM, SamplingParams
from lmq.llm import build_engine_config
from serve.server import BackgroundServer, make_app

BASE = "tiny"
STARTUP = ("qv4", "all8")  # served from the start; the others are loaded at run time
OPTS = dict(device="cpu", kv_cache_gb=0.05, max_model_len=512, enable_lora=True, max_loras=2, max_cpu_loras=2)


@pytest.fixture(scope="module")
def lora_dir(lora_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dir")
    for name, path in lora_adapters.items():
        shutil.copytree(path, root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_models, lora_adapters, lora_dir):
    config = build_engine_config(str(tiny_models["llama"]), **OPTS)
    app = make_app(config, BASE, adapters={n: lora_adapters[n] for n in STARTUP}, lora_dir=str(lora_dir))
    srv = BackgroundServer(app)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(tiny_models, lora_adapters) -> LLM:
    return LLM(str(tiny_models["llama"]), adapters=lora_adapters, **OPTS)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def _complete(client, model: str, prompt: list[int], n: int = 12) -> list[int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def test_models_lists_adapters_with_parent(server, client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *STARTUP}
    assert models[BASE].parent is None
    assert all(models[n].parent == BASE for n in STARTUP)


def test_concurrent_adapters_match_offline(server, client, offline, lora_dir):
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "mlp16", "lora_path": "mlp16"}).status_code == 200
    names = [BASE, "qv4", "all8", "mlp16"] * 6  # 3 adapters and the base model over 2 slots
    prompts = random_prompts(len(names), [5, 20, 37], seed=60)
    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda a: _complete(client, *a), zip(names, prompts)))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = offline.generate(prompts, greedy, adapter=[None if n == BASE else n for n in names])
    assert got == [o.outputs[0].token_ids for o in ref]
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "mlp16"}).status_code == 200


def test_runtime_load_then_unload(server, client, offline):
    prompt = random_prompts(1, [9], seed=61)[0]
    with pytest.raises(openai.NotFoundError):
        _complete(client, "kd64", prompt)
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "kd64", "lora_path": "kd64"})
    assert r.status_code == 200, r.text
    assert "kd64" in {m.id for m in client.models.list().data}
    ref = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), adapter="kd64")
    assert _complete(client, "kd64", prompt) == ref[0].outputs[0].token_ids
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "kd64"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "kd64", prompt)
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "kd64"}).status_code == 404


def test_unload_lets_running_stream_finish(server, client, lora_dir):
    engine = server.app.state.router.base.engine
    aborted_before = engine.stats().num_aborted
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "tmp", "lora_path": "qv4"}).status_code == 200
    with held_after(engine, 3):  # the stream is still running when the unload comes
        stream = client.completions.create(model="tmp", prompt="The quick brown", max_tokens=200, stream=True,
                                           temperature=0, logprobs=0, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].finish_reason is None
        assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "tmp"}).status_code == 200
        s = engine.stats()  # the unloaded adapter still holds its slot and its one request
        assert (s.num_running, s.num_lora_pins, s.num_lora_requests) == (1, 1, 1)
        with pytest.raises(openai.NotFoundError):  # gone for new requests at once
            client.completions.create(model="tmp", prompt="x", max_tokens=1)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    s = engine.stats()
    assert s.num_aborted == aborted_before and s.num_free_blocks == s.num_blocks
    assert (s.num_lora_pins, s.num_lora_requests) == (0, 0)
    metrics = httpx.get(server.url + "/metrics").text.splitlines()
    assert {"lmq_lora_slot_pins 0.0", "lmq_lora_requests 0.0"} <= set(metrics)


@pytest.mark.parametrize("body,status,message", [
    ({"lora_name": "x", "lora_path": "/etc"}, 403, "outside the allowed --lora-dir"),
    ({"lora_name": "x", "lora_path": "../../etc"}, 403, "outside the allowed --lora-dir"),
    ({"lora_name": "x", "lora_path": "nope"}, 400, "adapter_config.json is missing"),
    ({"lora_name": "qv4", "lora_path": "all8"}, 400, "already in use"),
    ({"lora_name": BASE, "lora_path": "all8"}, 400, "already in use"),
    ({"lora_name": "x"}, 400, "lora_path"),
])
def test_load_errors(server, body, status, message):
    r = _post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and err["type"]


def test_broken_adapter_is_400_with_reason(server, lora_dir):
    broken = lora_dir / "broken"
    shutil.copytree(lora_dir / "qv4", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "broken"})
    assert r.status_code == 400 and "cannot read the adapter weights" in r.json()["error"]["message"]


def test_unload_errors(server):
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404
    r = _post(server, "/v1/unload_lora_adapter", {"lora_name": BASE})
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]


def test_runtime_loading_off_without_lora_dir(tiny_models, lora_adapters):
    config = build_engine_config(str(tiny_models["llama"]), **OPTS)
    srv = BackgroundServer(make_app(config, BASE))
    try:
        r = _post(srv, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": lora_adapters["qv4"]})
        assert r.status_code == 403 and "--lora-dir" in r.json()["error"]["message"]
    finally:
        srv.stop()
