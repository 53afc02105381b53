"""Images through the server with the openai client: data URLs (string and {"url", "detail"}),
allowed local files, several images per message; every bad image is a 400 naming its part; an
encoder failure fails its request only; nothing leaks."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import SEED, wait_for
from lmq import LLM, SamplingParams
from lmq.llm import build_engine_config
from serve.server import BackgroundServer, make_app
from vision.media import MediaConfig
from vlm_fixtures import make_llava

MODEL = "tiny-llava"


def random_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(SEED + seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_llava(tmp_path_factory.mktemp("srv-llava") / "clip", "clip", seed=3)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "cat.png").write_bytes(png(random_image(37, 21, seed=1)))
    return d


@pytest.fixture(scope="module")
def server(folder, media_dir):
    config = build_engine_config(str(folder), device="cpu", dtype="float32", num_kv_blocks=128)
    media = MediaConfig(allowed_media_dir=str(media_dir), max_bytes=100_000)
    srv = BackgroundServer(make_app(config, MODEL, media=media, limit_images_per_prompt=2))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(folder) -> LLM:
    return LLM(str(folder), device="cpu", dtype="float32", num_kv_blocks=128)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _engine(server):
    return server.app.state.router.base.engine


def _wait_idle(server) -> None:
    def idle() -> bool:
        s = _engine(server).stats()
        return s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0

    wait_for(idle, "engine idle: every KV block free, nothing running or waiting")
    assert _engine(server).call_blocking("encoding.__len__", timeout=10) == 0
    _engine(server).call_blocking("block_manager.check_integrity", timeout=10)


def _user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


GREEDY = dict(temperature=0.0, max_tokens=8, extra_body={"ignore_eos": True})


def test_data_urls_and_files_answer_as_the_offline_api(server, client, offline, media_dir):
    a, b = random_image(41, 17, seed=10), random_image(18, 44, seed=11)
    msgs = _user({"type": "image_url", "image_url": {"url": data_url(a), "detail": "low"}}, _text("and"),
                 {"type": "image_url", "image_url": {"url": f"file://{media_dir / 'cat.png'}"}}, _text("what?"))
    got = client.chat.completions.create(model=MODEL, messages=msgs, **GREEDY)
    cat = Image.open(media_dir / "cat.png")
    ref = offline.chat(_user({"type": "image_pil", "image_pil": a}, _text("and"),
                             {"type": "image_pil", "image_pil": cat}, _text("what?")),
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert got.choices[0].message.content == ref.outputs[0].text
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)  # the image tokens count
    # Streaming, and an image_url given as a plain string (as some clients send it).
    stream = client.chat.completions.create(
        model=MODEL, messages=_user({"type": "image_url", "image_url": {"url": data_url(b)}}, _text("hi")),
        stream=True, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    body = {"model": MODEL, "temperature": 0.0, "max_tokens": 8, "ignore_eos": True,
            "messages": _user({"type": "image_url", "image_url": data_url(b)}, _text("hi"))}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
    _wait_idle(server)


def _bad(server, parts: list[dict]) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "max_tokens": 4, "messages": _user(*parts)})
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "cannot be decoded"),
    ("data:image/png;base64,@@@", "base64 payload is invalid"),
    ("http://127.0.0.1:9/cat.png", "non-public address 127.0.0.1"),
    ("http://localhost:9/cat.png", "non-public address"),  # a name that resolves to loopback
    ("http://169.254.169.254/latest/meta-data", "non-public address 169.254.169.254"),
    ("file:///etc/hostname", "outside the allowed media directory"),
    ("gopher://example.com/x", "scheme 'gopher' is not supported"),
])
def test_refused_images_are_400_naming_the_part(server, url, words):
    err = _bad(server, [_text("look"), {"type": "image_url", "image_url": {"url": url}}])
    assert words in err["message"] and err["message"].startswith("messages[0].content[1]: ")
    assert err["param"] == "messages[0].content[1]" and err["type"] == "invalid_request_error"


def test_oversized_and_too_many_images_are_400(server):
    big = random_image(300, 300, seed=2)  # ~270 kB of noise as PNG, over the 100 kB limit
    err = _bad(server, [{"type": "image_url", "image_url": {"url": data_url(big)}}])
    assert "over the limit of 100000" in err["message"]
    small = {"type": "image_url", "image_url": {"url": data_url(random_image(8, 8, seed=3))}}
    err = _bad(server, [small, small, small])
    assert "3 images, over the limit of --limit-images-per-prompt=2" in err["message"]
    err = _bad(server, [{"type": "image", "image": "cat.png"}])  # a part type the API does not take
    assert "messages[0].content[0].type='image' is not supported" in err["message"]
    _wait_idle(server)


def test_an_encoder_failure_fails_only_its_request(server, client):
    engine = _engine(server)
    image = {"type": "image_url", "image_url": {"url": data_url(random_image(20, 20, seed=4))}}
    engine.set_debug_hooks(fail_encodes=1)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "max_tokens": 4, "messages": _user(image, _text("x"))})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    _wait_idle(server)
    ok = client.chat.completions.create(model=MODEL, messages=_user(image, _text("x")), **GREEDY)
    assert ok.choices[0].finish_reason == "length" and httpx.get(server.url + "/health").status_code == 200
    _wait_idle(server)
