"""The web chat with a LLaVA model, in headless Chromium: images uploaded, pasted and dropped
into the input box are shown in the history and answered as the API answers the same request;
a broken image is refused with the server's message and the chat goes on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import PROMPTS
from lmq.llm import build_engine_config
from serve.server import BackgroundServer, make_app
from test_server_vision import png, random_image
from ui_driver import CHROMIUM, alnum
from vlm_fixtures import make_llava

pytest.importorskip("gradio", reason="the web chat needs the `ui` extra: pip install -e '.[ui]'")
pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (dev extra)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium (needs root and apt)",
                allow_module_level=True)

from ui.mount import mount_ui  # noqa: E402  (after the skips: gradio is optional)

MODEL = "tiny-llava"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny LLaVA whose greedy answer to an image shows letters: some random weights repeat a
    newline forever (seed 4002's did), so a few are tried; these tests are of the UI."""
    root = tmp_path_factory.mktemp("ui-llava")
    for seed in range(4, 10):
        folder = make_llava(root / f"clip{seed}", "clip", seed=seed)
        config = build_engine_config(str(folder), device="cpu", dtype="float32", num_kv_blocks=128)
        srv = BackgroundServer(mount_ui(make_app(config, MODEL, limit_images_per_prompt=2)))
        if _visible(srv, 1) and _visible(srv, 2):
            break
        srv.stop()
    else:
        pytest.fail("no tiny LLaVA of 6 answers an image with letters")
    yield srv
    srv.stop()


def api_answer(srv, text: str, images: list[bytes]) -> str:
    parts = [{"type": "image_url", "image_url": {"url": data_url_of(b)}} for b in images]
    body = {"model": MODEL, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            "temperature": 0, "max_tokens": MAX_TOKENS}
    resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def data_url_of(png_bytes: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()


def _visible(srv, n_images: int) -> tuple[str, list[bytes], str] | None:
    for seed in range(8):
        images = [png(random_image(31 + 7 * i, 23 + 5 * i, seed=seed * 10 + i)) for i in range(n_images)]
        for prompt in PROMPTS[:3]:
            if len(alnum(ref := api_answer(srv, prompt, images))) >= 3:
                return prompt, images, ref
    return None


def visible_case(srv, n_images: int) -> tuple[str, list[bytes], str]:
    """Images and a prompt whose answer shows letters (a random model's may show none)."""
    case = _visible(srv, n_images)
    if case is None:
        pytest.fail("no image and prompt get an answer with letters from the tiny LLaVA")
    return case


def _chat(srv, new_page):
    chat = new_page(srv.url + "/ui/").open()
    chat.greedy(MAX_TOKENS)
    return chat


def test_uploaded_image_is_shown_and_answered_like_the_api(server, new_page, tmp_path):
    prompt, (image,), ref = visible_case(server, 1)
    chat = _chat(server, new_page)
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    chat.attach(path)
    chat.send(prompt)
    assert alnum(chat.bot_texts()[-1]) == alnum(ref)
    assert chat.page.locator("#chat [data-testid=user] img").count() == 1, "the image is not in the history"
    chat.screenshot("vision")


def test_pasted_and_dropped_images_are_sent_in_order(server, new_page):
    prompt, (first, second), ref = visible_case(server, 2)
    chat = _chat(server, new_page)
    chat.paste_image(first)
    chat.drop_image(second)
    chat.send(prompt)
    assert alnum(chat.bot_texts()[-1]) == alnum(ref)
    assert chat.page.locator("#chat [data-testid=user] img").count() == 2


def test_broken_image_is_refused_and_the_chat_goes_on(server, new_page, tmp_path):
    prompt, (image,), ref = visible_case(server, 1)
    chat = _chat(server, new_page)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really an image")
    chat.attach(broken)
    chat.send(prompt)
    assert "400" in chat.status() and "messages[0].content[0]" in chat.status()
    good = tmp_path / "good.png"
    good.write_bytes(image)
    chat.attach(good)
    chat.send(prompt)  # the refused turn is not sent again: the request is the API's
    assert alnum(chat.bot_texts()[-1]) == alnum(ref)
