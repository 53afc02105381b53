"""The web chat, for real: `lmq serve --ui`'s app (uvicorn on a free loopback port, the page at
/ui behind the API-key login) driven in headless Chromium. Answers are compared with the API's
answers to the same requests; the stop button must make the server free the request."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import PROMPTS, held_after, make_model, wait_for
from lmq import LLM, SamplingParams
from lmq.llm import build_engine_config
from serve.server import BackgroundServer, make_app
from test_server_vision import png, random_image
from ui_driver import CHROMIUM, ChatPage, alnum

pytest.importorskip("gradio", reason="the web chat needs the `ui` extra: pip install -e '.[ui]'")
pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (dev extra)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium (needs root and apt)",
                allow_module_level=True)

from ui.mount import mount_ui  # noqa: E402  (after the skips: gradio is optional)

BASE = "tiny"
KEY, OTHER_KEY = "sk-ui-test", "sk-ui-other"
ADAPTERS = ("qv4", "all8")
MAX_TOKENS = 24


def _start(folder, adapters: dict[str, str] | None = None, **opts) -> BackgroundServer:
    """`lmq serve --api-keys KEY,OTHER_KEY --ui` on the tiny llama."""
    queue = opts.pop("max_queue_len", None)
    config = build_engine_config(str(folder), device="cpu", kv_cache_gb=0.05, max_model_len=512,
                                 enable_lora=bool(adapters), max_loras=2, **opts)
    app = make_app(config, BASE, (KEY, OTHER_KEY), max_queue_len=queue, adapters=adapters)
    return BackgroundServer(mount_ui(app, (KEY, OTHER_KEY)))


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama, or, where its greedy chat answers show no letters (some random weights
    repeat a newline forever), the first of a few more random llamas whose answers do: these
    tests are of the UI, and compare what it shows with what the API answers."""
    root = tmp_path_factory.mktemp("chat-model")
    for k in range(6):
        folder = tiny_models["llama"] if k == 0 else make_model(root / f"llama{k}", "llama", seed=50 + k)
        llm = LLM(str(folder), device="cpu", kv_cache_gb=0.05, max_model_len=512)
        outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        del llm
        if any(len(alnum(o.outputs[0].text)) >= 3 for o in outs):
            return folder
    pytest.fail("no random llama of 6 answers a chat prompt with letters")


@pytest.fixture(scope="module")
def server(chat_model, lora_adapters):
    srv = _start(chat_model, {n: lora_adapters[n] for n in ADAPTERS})
    yield srv
    srv.stop()


def _engine(srv):
    return srv.app.state.router.base.engine


def _wait_idle(srv) -> None:
    def idle() -> bool:
        s = _engine(srv).stats()
        return s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0

    wait_for(idle, "engine idle: every KV block free, nothing running or waiting")
    _engine(srv).call_blocking("block_manager.check_integrity", timeout=10)


def api_answer(srv, model: str, messages: list[dict], key: str = KEY, max_tokens: int = MAX_TOKENS) -> dict:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    resp = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def answer_text(srv, model: str, prompt: str) -> str:
    return api_answer(srv, model, [{"role": "user", "content": prompt}])["choices"][0]["message"]["content"]


def visible_prompt(srv, model: str = BASE) -> str:
    """A prompt whose greedy answer shows letters or digits: a random model's answer may be all
    bytes that render as nothing comparable."""
    for prompt in PROMPTS:
        if len(alnum(answer_text(srv, model, prompt))) >= 3:
            return prompt
    pytest.fail(f"no prompt of {PROMPTS} gets an answer with letters from {model!r}")


def _chat(srv, new_page, user: str = "tester", key: str = KEY) -> ChatPage:
    chat = new_page(srv.url + "/ui/").open(user, key)
    chat.greedy(MAX_TOKENS)
    return chat


# -- text chat -----------------------------------------------------------------------------
def test_streamed_answer_equals_the_apis(server, new_page):
    chat = _chat(server, new_page)
    prompt = visible_prompt(server)
    assert chat.model_choices() == [BASE, *ADAPTERS]
    _engine(server).set_debug_hooks(step_delay=0.05)  # slow steps: the page shows the answer growing
    try:
        chat.send_nowait(prompt)
        chat.page.wait_for_function(
            "(() => { const b = document.querySelectorAll('#chat [data-testid=bot]');"
            " return b.length === 1 && b[0].innerText.trim().length > 0"
            " && !document.querySelector('#status').innerText.includes('completion tokens'); })()",
            timeout=60_000)  # part of the answer shown while it is still being generated
        chat.wait_answer(1)
    finally:
        _engine(server).set_debug_hooks()
    ref = api_answer(server, BASE, [{"role": "user", "content": prompt}])
    text = ref["choices"][0]["message"]["content"]
    assert alnum(chat.bot_texts()[0]) == alnum(text) and alnum(text)
    assert chat.stats() == (ref["usage"]["prompt_tokens"], ref["usage"]["completion_tokens"])
    chat.screenshot("chat")
    _wait_idle(server)


def test_adapter_answer_equals_the_apis_for_that_adapter(server, new_page):
    chat = _chat(server, new_page)
    pairs = ((p, a) for p in PROMPTS for a in ADAPTERS)
    for prompt, adapter in pairs:  # an adapter answer with letters, other than the base model's
        ref = answer_text(server, adapter, prompt)
        if len(alnum(ref)) >= 3 and alnum(ref) != alnum(answer_text(server, BASE, prompt)):
            break
    else:
        pytest.fail("no adapter answer differs visibly from the base model's: the adapters change nothing")
    chat.pick_model(adapter)
    chat.send(prompt)
    assert alnum(chat.bot_texts()[-1]) == alnum(ref)
    assert adapter in chat.status()
    _wait_idle(server)


def test_stop_aborts_the_request_on_the_server(server, new_page):
    chat = _chat(server, new_page)
    chat.set_number("max_tokens", 400)
    engine = _engine(server)
    before = engine.stats().num_aborted
    with held_after(engine, 3):  # the answer is still running when stop is pressed, on any machine
        chat.send_nowait(PROMPTS[0])
        wait_for(lambda: engine.stats().num_running == 1, "the page's request runs on the engine")
        chat.click("stop")
        chat.wait_status("Stopped.", "the page shows the answer stopped")
        wait_for(lambda: engine.stats().num_aborted == before + 1, "the server aborts the stopped request")
        s = engine.stats()
        assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_blocks, s
    metrics = httpx.get(server.url + "/metrics").text
    assert "lmq_num_requests_running 0.0" in metrics and "lmq_num_requests_waiting 0.0" in metrics
    chat.send("and then?")  # the chat goes on after a stop
    assert "completion tokens" in chat.status() and len(chat.user_texts()) == 2
    _wait_idle(server)


def test_queue_full_is_shown_and_the_chat_goes_on(chat_model, new_page):
    # One sequence slot and a queue of one: a held request and one waiting fill the server.
    server = _start(chat_model, max_num_seqs=1, max_queue_len=1)
    try:
        _queue_full_then_retry(server, new_page)
    finally:
        server.stop()


def _queue_full_then_retry(server, new_page) -> None:
    chat = _chat(server, new_page)
    prompt = visible_prompt(server)
    engine = _engine(server)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": BASE, "prompt": "The quick", "max_tokens": 400, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    with held_after(engine, 2), httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth,
                                             timeout=60) as running:
        lines = running.iter_lines()
        next(lines)  # running and held: it keeps the only sequence slot
        waiting = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                                   kwargs={"json": {**body, "stream": False}, "headers": auth, "timeout": 60})
        waiting.start()
        wait_for(lambda: engine.stats().num_waiting == 1, "a second request waits in the queue of one")
        chat.send(prompt)
        assert "429" in chat.status() and "queue is full" in chat.status()
        assert "queue is full" in chat.bot_texts()[-1]
    waiting.join(60)
    _wait_idle(server)
    chat.click("retry")  # the refused turn asks again, now that the server has room
    chat.wait_status("completion tokens", "the retried turn answered")
    assert "completion tokens" in chat.status()
    assert alnum(chat.bot_texts()[-1]) == alnum(answer_text(server, BASE, prompt))
    _wait_idle(server)


def test_unknown_adapter_and_image_to_a_text_model_are_shown(server, new_page, tmp_path, lora_adapters):
    chat = _chat(server, new_page)
    prompt = visible_prompt(server)
    image = tmp_path / "cat.png"
    image.write_bytes(png(random_image(20, 20, seed=5)))
    chat.attach(image)
    chat.send("what is this?")
    assert "does not accept images" in chat.status() and "400" in chat.status()
    chat.pick_model("all8")
    auth = {"Authorization": f"Bearer {KEY}"}
    resp = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "all8"}, headers=auth, timeout=30)
    assert resp.status_code == 200, resp.text
    try:
        chat.send(prompt)
        assert "404" in chat.status() and "'all8' does not exist" in chat.status()
        chat.click("reload-models")
        chat.page.wait_for_function("document.querySelector('#model input').value === 'tiny'", timeout=60_000)
        assert "all8" not in chat.model_choices()
        chat.send(prompt)  # the chat goes on: refused turns stay visible but are not sent again
        assert alnum(chat.bot_texts()[-1]) == alnum(answer_text(server, BASE, prompt))
    finally:  # serve it again, as at start, for the tests after this one
        _engine(server).call_blocking("load_adapter", "all8", lora_adapters["all8"], timeout=30)
        server.app.state.router.add_adapter("all8", lora_adapters["all8"])
    _wait_idle(server)


# -- sessions, editing, login ----------------------------------------------------------------
def test_two_sessions_keep_separate_histories(server, new_page):
    # Two users with their own keys, side by side: each page shows its own turns only.
    alice, bob = _chat(server, new_page, "alice", KEY), _chat(server, new_page, "bob", OTHER_KEY)
    alice.send_nowait("alice asks about " + PROMPTS[0])
    bob.send_nowait("bob asks about " + PROMPTS[1])
    alice.wait_answer(1)
    bob.wait_answer(1)
    assert alice.user_texts() == ["alice asks about " + PROMPTS[0]]
    assert bob.user_texts() == ["bob asks about " + PROMPTS[1]]
    alice.send("alice again")
    assert "completion tokens" in bob.status() and len(bob.user_texts()) == 1
    assert all("bob" not in t for t in alice.user_texts() + alice.bot_texts())
    alice.click("new-chat")
    alice.wait_status("New chat.", "alice's new chat")
    assert alice.user_texts() == [] and bob.user_texts() == ["bob asks about " + PROMPTS[1]]
    _wait_idle(server)


def test_retry_undo_edit_and_system_prompt(server, new_page):
    chat = _chat(server, new_page)
    prompt = visible_prompt(server)
    chat.send(prompt)
    first = chat.bot_texts()[-1]
    chat.set_number("seed", 7)
    chat.set_number("temperature", 1.5)
    body = {"model": BASE, "messages": [{"role": "user", "content": prompt}], "temperature": 1.5, "seed": 7,
            "max_tokens": MAX_TOKENS, "top_p": 1.0}
    ref = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=60).json()["choices"][0]["message"]["content"]
    chat.click("retry")  # sampled with a seed: the API's answer to the same seeded request
    chat.wait_last_answer_alnum(ref, "the retried answer, the API's to the same seeded request")
    assert len(chat.user_texts()) == 1 and alnum(chat.bot_texts()[-1]) == alnum(ref)
    chat.set_number("temperature", 0)
    chat.set_number("seed", -1)
    chat.click("undo")
    chat.page.wait_for_function("document.querySelectorAll('#chat [data-testid=user]').length === 0",
                                timeout=60_000)
    chat.page.fill("#input textarea", "draft")
    chat.send(prompt)
    chat.click("edit")  # the last question comes back into the input box, out of the history
    chat.wait_status("Editing the last message", "the last message back in the input box")
    assert chat.page.input_value("#input textarea") == prompt and chat.user_texts() == []
    system = "You are terse."
    chat.page.locator("#system textarea").fill(system)
    chat.page.press("#input textarea", "Enter")  # resend the edited (unchanged) text, now with a system prompt
    chat.wait_answer(1)
    ref = api_answer(server, BASE, [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    assert alnum(chat.bot_texts()[-1]) == alnum(ref["choices"][0]["message"]["content"])
    assert chat.stats()[0] == ref["usage"]["prompt_tokens"]
    assert alnum(first) == alnum(answer_text(server, BASE, prompt))
    _wait_idle(server)


def test_login_needs_a_server_key_and_binds_the_user_to_it(server, new_page):
    _chat(server, new_page, "carol", KEY)  # carol's name is now bound to KEY
    for user, key in (("mallory", "sk-wrong"), ("carol", OTHER_KEY)):
        page = new_page(server.url + "/ui/").page
        page.goto(server.url + "/ui/")
        page.wait_for_selector("input[type=password]", timeout=60_000)
        page.fill("input[type=text]", user)
        page.fill("input[type=password]", key)
        page.keyboard.press("Enter")
        page.get_by_text("Incorrect Credentials").wait_for(timeout=60_000)
        assert page.locator("#input textarea").count() == 0, f"{user} logged in with {key!r}"
    assert httpx.get(server.url + "/ui/gradio_api/info", timeout=30).status_code in (401, 403)


# -- the two commands ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _banner(proc: subprocess.Popen, words: str) -> str:
    for line in proc.stdout:
        if words in line:
            return line
    raise AssertionError(f"the command exited ({proc.wait()}) without printing {words!r}")


def _wait_http(url: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_lmq_ui_alone_chats_with_any_openai_server(server, new_page):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmq.cli", "ui", "--api-url", server.url + "/v1", "--api-key", KEY,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/" in _banner(proc, "web chat")
        assert _wait_http(f"http://127.0.0.1:{port}/").status_code == 200
        chat = new_page(f"http://127.0.0.1:{port}/").open()  # no login: the key was given to `lmq ui`
        chat.greedy(MAX_TOKENS)
        prompt = visible_prompt(server)
        chat.send(prompt)
        assert alnum(chat.bot_texts()[-1]) == alnum(answer_text(server, BASE, prompt))
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    _wait_idle(server)


def test_lmq_serve_ui_prints_the_chat_url(tiny_models):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmq.cli", "serve", str(tiny_models["llama"]), "--ui", "--port",
                             str(port), "--device", "cpu", "--kv-cache-gb", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"http://127.0.0.1:{port}/ui" in _banner(proc, "web chat at")
        page = _wait_http(f"http://127.0.0.1:{port}/ui/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_default_model_answers_in_the_chat(new_page):
    """`make serve`'s chat: the built-in SmolLM2-135M-Instruct (real weights) knows Paris."""
    config = build_engine_config(None, device="cpu", kv_cache_gb=0.1, max_model_len=1024)
    srv = BackgroundServer(mount_ui(make_app(config)))
    try:
        chat = new_page(srv.url + "/ui/").open()
        chat.greedy(48)
        chat.page.locator("#system textarea").fill("You are a helpful assistant.")
        chat.send("What is the capital of France?")
        assert "Paris" in chat.bot_texts()[-1]
        chat.set_number("max_tokens", 80)
        chat.send("Write a one-line Python function that adds two numbers, in a code block.")
        chat.wait_answer(2)
        chat.screenshot("default-model-chat")  # docs/chat.png is a copy of this one
    finally:
        srv.stop()


def _ok_requests(srv) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=30).text
    ok = 'lmq_requests_total{status="200"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(ok))


def test_retry_during_an_answer_gives_one_clean_answer(server, new_page):
    """Retry pressed while the answer streams: the older answer stops (its request is aborted)
    instead of streaming into the same turn as the newer one."""
    chat = _chat(server, new_page)
    prompt = visible_prompt(server)
    before = _ok_requests(server)
    _engine(server).set_debug_hooks(step_delay=0.05)  # the first answer still streams at the retry
    try:
        chat.send_nowait(prompt)
        wait_for(lambda: _ok_requests(server) > before, "the question reaches the server")
        chat.click("retry")
        wait_for(lambda: _ok_requests(server) > before + 1, "the retry reaches the server")
        _wait_idle(server)
    finally:
        _engine(server).set_debug_hooks()
    chat.wait_status("completion tokens", "the retried answer")
    assert alnum(chat.bot_texts()[-1]) == alnum(answer_text(server, BASE, prompt))
    assert len(chat.bot_texts()) == 1
