"""Every request field is honoured or refused (issue 17, the vLLM drop-in): the OpenAI and vLLM
extra sampling fields change the output the way they should; unknown fields and fields lmq
cannot serve are a 400 naming them, and the server keeps serving after. Also /tokenize,
/detokenize, /ping, /version and the vLLM metric names. A real server on a loopback port."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import lmq
from conftest import PROMPTS, plain_piece, wait_for
from lmq.llm import build_engine_config
from serve.metrics import VLLM_NAMES
from serve.server import BackgroundServer, make_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "The quick brown fox"}]
EOS, IM_END = 2, 4  # conftest's tokenizer: </s>, <|im_end|>


@pytest.fixture(scope="module")
def server(tiny_models):
    config = build_engine_config(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.05, block_size=8,
                                 max_model_len=512)
    srv = BackgroundServer(make_app(config, MODEL))
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def _error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


def _ids(client, prompt: str | list[int], **kw) -> tuple[list[int], str, str]:
    """(token ids, text, finish_reason) of one completion."""
    extra = {"return_tokens_as_token_ids": True, **kw.pop("extra_body", {})}
    c = client.completions.create(model=MODEL, prompt=prompt, logprobs=0, extra_body=extra, **kw).choices[0]
    return [int(t.removeprefix("token_id:")) for t in c.logprobs.tokens], c.text, c.finish_reason


def _wait_idle(server) -> None:
    engine = server.app.state.router.base.engine

    def idle() -> bool:
        s = engine.stats()
        return s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0

    wait_for(idle, "engine idle: every KV block free, nothing running or waiting", 10)
    engine.call_blocking("block_manager.check_integrity", timeout=10)


# -- refused -----------------------------------------------------------------------------------
CMPL = {"model": MODEL, "prompt": "The quick", "max_tokens": 3}
CHAT_BODY = {"model": MODEL, "messages": CHAT, "max_tokens": 3}


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {**CHAT_BODY, "unknown_field": [1, 2], "another": 1}, "unknown_field",
     ["'unknown_field'", "'another'", "refused rather than ignored"]),
    ("/v1/completions", {**CMPL, "frobnicate": True}, "frobnicate", ["'frobnicate'"]),
    ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "user", "content": "hi", "extra": 1}]},
     "messages[0].extra", ["'messages[0].extra'"]),
    ("/v1/chat/completions", {**CHAT_BODY, "stream_options": {"include_usage": True, "bogus": 1}},
     "stream_options.bogus", ["'stream_options.bogus'"]),
    # response_format / guided_* are served (tests/test_structured_output.py); structural tags are not
    ("/v1/chat/completions", {**CHAT_BODY, "structural_tag": "{}"}, "structural_tag",
     ["structured output is not supported yet"]),
    # tools are served (tests/test_tool_calls.py); this model's ChatML template has no tool support
    ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     ["no tool support"]),
    ("/v1/chat/completions", {**CHAT_BODY, "tool_choice": "auto"}, "tool_choice", ["needs tools"]),
    ("/v1/chat/completions", {**CHAT_BODY, "functions": [{"name": "f"}]}, "functions", ["tool calling"]),
    ("/v1/completions", {**CMPL, "suffix": "end"}, "suffix", ["suffix"]),
    ("/v1/completions", {**CMPL, "best_of": 3}, "best_of", ["best_of=3", "n=1"]),
    ("/v1/completions", {**CMPL, "spaces_between_special_tokens": True}, "spaces_between_special_tokens",
     ["only false"]),
    ("/v1/completions", {**CMPL, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", ["stream=true"]),
    ("/v1/completions", {**CMPL, "logit_bias": {"5": 200}}, "logit_bias[5]", ["logit_bias[5]=200.0", "[-100, 100]"]),
    ("/v1/chat/completions", {**CHAT_BODY, "logit_bias": {"abc": 1}}, "logit_bias", ["'abc'", "token ids"]),
    ("/v1/completions", {**CMPL, "logit_bias": {"100000": 5}}, "logit_bias", ["token id 100000", "[0, 384)"]),
    ("/v1/completions", {**CMPL, "allowed_token_ids": [7, 384]}, "allowed_token_ids", ["token id 384"]),
    ("/v1/completions", {**CMPL, "allowed_token_ids": []}, "allowed_token_ids", ["non-empty"]),
    ("/v1/completions", {**CMPL, "min_tokens": 5}, "min_tokens", ["min_tokens=5", "max_tokens=3"]),
    ("/v1/completions", {**CMPL, "bad_words": [" "]}, "bad_words", ["non-blank"]),
    ("/v1/chat/completions", {**CHAT_BODY, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     ["top_logprobs=21", "[0, 20]"]),
    ("/v1/chat/completions", {**CHAT_BODY, "continue_final_message": True}, "continue_final_message",
     ["add_generation_prompt=false"]),
    ("/v1/chat/completions", {**CHAT_BODY, "chat_template_kwargs": {"tokenize": True}},
     "chat_template_kwargs.tokenize", ["not a template variable"]),
])
def test_unknown_and_unsupported_fields_are_400_naming_them(server, client, path, body, param, words):
    err = _error(_post(server, path, body), 400, *words)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert client.completions.create(model=MODEL, prompt="The quick", max_tokens=2).choices  # still serving


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"),
    ("spaces_between_special_tokens", False), ("best_of", 1), ("user", "end-user-7")])
def test_values_that_ask_for_nothing_are_accepted(server, field, value):
    assert _post(server, "/v1/chat/completions", {**CHAT_BODY, field: value}).status_code == 200


# -- honoured ----------------------------------------------------------------------------------
def test_logit_bias_forces_and_forbids_tokens(client):
    forced, _, _ = _ids(client, "The quick", max_tokens=8, temperature=1.0, seed=3,
                        logit_bias={"65": 100}, extra_body={"ignore_eos": True})
    assert forced == [65] * 8
    greedy, _, _ = _ids(client, "The quick", max_tokens=1, temperature=0)
    other, _, _ = _ids(client, "The quick", max_tokens=1, temperature=0, logit_bias={str(greedy[0]): -100})
    assert other[0] != greedy[0]


def test_min_tokens_holds_eos_back(client):
    bias = {str(EOS): 100}
    ids, _, reason = _ids(client, "The quick", max_tokens=20, temperature=0, logit_bias=bias)
    assert ids == [EOS] and reason == "stop"
    ids, _, reason = _ids(client, "The quick", max_tokens=20, temperature=0, logit_bias=bias,
                          extra_body={"min_tokens": 5})
    assert len(ids) == 6 and EOS not in ids[:5] and ids[5] == EOS and reason == "stop"


def test_allowed_token_ids_and_bad_words_restrict_the_output(client, server):
    allowed = [40, 41, 77]
    ids, _, _ = _ids(client, "The quick", max_tokens=24, temperature=1.5, seed=1,
                     extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert set(ids) <= set(allowed) and len(ids) == 24
    tok = server.app.state.router.base.tokenizer
    # words that are one token on their own; greedy restricted to them (the random model's own
    # greedy output need not hold such a word), then banning the first one it picks removes it
    # (special tokens decode to "" here, so they are never picked)
    words = [t for t in range(len(tok)) if (w := tok.decode([t])).strip()
             and tok.encode(w, add_special_tokens=False) == [t]][:4]
    assert len(words) == 4, words
    greedy, _, _ = _ids(client, "The quick", max_tokens=12, temperature=0,
                        extra_body={"ignore_eos": True, "allowed_token_ids": words})
    banned = greedy[0]
    ids, _, _ = _ids(client, "The quick", max_tokens=12, temperature=0,
                     extra_body={"ignore_eos": True, "allowed_token_ids": words, "bad_words": [tok.decode([banned])]})
    assert set(ids) <= set(words) and banned not in ids and len(ids) == 12


def test_stop_token_ids_and_include_stop_str(client):
    greedy, text, _ = _ids(client, "The quick", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    stop_at = greedy.index(greedy[4])
    ids, _, reason = _ids(client, "The quick", max_tokens=12, temperature=0,
                          extra_body={"ignore_eos": True, "stop_token_ids": [greedy[4]]})
    assert ids == greedy[:stop_at + 1] and reason == "stop"
    for prompt in PROMPTS:
        text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        if stop := plain_piece(text, 1):
            break
    assert stop, "no output with a plain character"
    kept = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]


def test_skip_special_tokens_false_shows_them(client):
    body = {"max_tokens": 3, "temperature": 0, "logit_bias": {str(IM_END): 100}}
    hidden = client.completions.create(model=MODEL, prompt="Hi", extra_body={"ignore_eos": True}, **body)
    shown = client.completions.create(model=MODEL, prompt="Hi", extra_body={"ignore_eos": True,
                                                                            "skip_special_tokens": False}, **body)
    assert hidden.choices[0].text == "" and shown.choices[0].text == "<|im_end|>" * 3


def test_top_k_1_and_min_p_1_are_greedy_and_max_completion_tokens_counts(client):
    greedy, _, _ = _ids(client, "Hello", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        ids, _, _ = _ids(client, "Hello", max_tokens=10, temperature=1.5, seed=9,
                         extra_body={"ignore_eos": True, **extra})
        assert ids == greedy, extra
    penalized, _, _ = _ids(client, "Hello", max_tokens=10, temperature=0,
                           extra_body={"ignore_eos": True, "repetition_penalty": 10.0})
    assert penalized != greedy or len(set(greedy)) == len(greedy)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, max_completion_tokens=7,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7


def test_echo_puts_the_prompt_first(client, server):
    tok = server.app.state.router.base.tokenizer
    prompt = "The quick brown"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                       logprobs=1, extra_body={"ignore_eos": True}).choices[0]
    assert echoed.text == prompt + plain.text
    prompt_ids = tok.encode(prompt)
    assert len(echoed.logprobs.tokens) == len(prompt_ids) + 5
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in echoed.logprobs.token_logprobs[1:])
    stream = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=5, temperature=0, echo=True,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == tok.decode(prompt_ids, False) + plain.text


def test_prompt_logprobs(server):
    tok = server.app.state.router.base.tokenizer
    r = _post(server, "/v1/completions", {**CMPL, "prompt_logprobs": 2}).json()
    plps = r["choices"][0]["prompt_logprobs"]
    ids = tok.encode("The quick")
    assert len(plps) == len(ids) and plps[0] is None
    for t, entry in zip(ids[1:], plps[1:]):
        assert str(t) in entry and len(entry) >= 2 and entry[str(t)]["rank"] >= 1
    chat = _post(server, "/v1/chat/completions", {**CHAT_BODY, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert "prompt_logprobs" not in _post(server, "/v1/completions", CMPL).json()["choices"][0]


def test_chat_template_kwargs_add_generation_prompt_and_continue_final_message(server):
    tok = server.app.state.router.base.tokenizer
    original = tok.hf.chat_template
    tok.hf.chat_template = original + "{% if enable_thinking %}<think>\n{% endif %}"
    try:
        def count(**kw) -> int:
            r = _post(server, "/v1/chat/completions", {**CHAT_BODY, **kw})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        assert count(chat_template_kwargs={"enable_thinking": True}) > count() == \
            count(chat_template_kwargs={"enable_thinking": False})
    finally:
        tok.hf.chat_template = original
    no_prompt = _post(server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    with_prompt = _post(server, "/tokenize", {"messages": CHAT}).json()
    assert with_prompt["tokens"] == no_prompt["tokens"] + tok.encode("<|im_start|>assistant\n", False)
    partial = CHAT + [{"role": "assistant", "content": "Hel"}]
    cont = _post(server, "/tokenize", {"messages": partial, "add_generation_prompt": False,
                                       "continue_final_message": True}).json()
    assert cont["tokens"] == with_prompt["tokens"] + tok.encode("Hel", False)


# -- endpoints ---------------------------------------------------------------------------------
def test_tokenize_detokenize_ping_version(server):
    tok = server.app.state.router.base.tokenizer
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": "The quick brown", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("The quick brown") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512 and r["token_strs"] == tok.hf.convert_ids_to_tokens(r["tokens"])
    bare = _post(server, "/tokenize", {"prompt": "The quick brown", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("The quick brown", False) and bare["token_strs"] is None
    assert _post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": tok.decode(r["tokens"], False)}
    err = _error(_post(server, "/detokenize", {"tokens": [5, 384, -1]}), 400, "tokens[1]=384", "tokens[2]=-1",
                 "[0, 384)")
    assert err["param"] == "tokens[1]"
    assert _error(_post(server, "/tokenize", {"model": "nope", "prompt": "x"}), 404)["param"] == "model"
    assert _error(_post(server, "/tokenize", {"prompt": "x", "messages": CHAT}), 400)["param"] == "messages"
    assert _error(_post(server, "/tokenize", {"prompt": "x", "bogus": 1}), 400)["param"] == "bogus"
    for method in ("GET", "POST"):
        assert httpx.request(method, server.url + "/ping").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": lmq.__version__}


def _samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_under_lmq_and_vllm_names_agree(server, client):
    _wait_idle(server)
    before = _samples(server)
    for n in (3, 5):
        client.completions.create(model=MODEL, prompt="The quick", max_tokens=n, extra_body={"ignore_eos": True})
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logit_bias={str(EOS): 100})
    _wait_idle(server)
    after = _samples(server)
    vllm = {k: v for k, v in after.items() if k[0].startswith("vllm:")}
    names = {n.split(":")[1].removesuffix("_total") for n, _ in vllm}
    for want in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc",
                 "prompt_tokens", "generation_tokens", "request_success", "num_preemptions",
                 "time_to_first_token_seconds_count", "e2e_request_latency_seconds_bucket",
                 "request_time_per_output_token_seconds_sum", "request_prompt_tokens_count",
                 "request_generation_tokens_sum", "prefix_cache_queries", "prefix_cache_hits"):
        assert want in names, want
    # every vllm: sample equals its lmq_ twin (same labels but model_name)
    twins = {vname: lname for lname, vs in VLLM_NAMES.items() for vname, _ in vs}
    for (name, labels), value in vllm.items():
        assert dict(labels)["model_name"] == MODEL
        family = next(v for v in sorted(twins, key=len, reverse=True) if name.startswith(v))
        suffix = name[len(family):]
        rest = tuple(kv for kv in labels if kv[0] != "model_name")
        lmq_name = twins[family] + suffix
        if (lmq_name, rest) not in after and suffix == "_total":
            lmq_name = twins[family]  # a gauge in lmq, a counter in vLLM
        assert after[(lmq_name, rest)] == value, (name, lmq_name)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0)

    assert grew("vllm:generation_tokens_total", (("model_name", MODEL),)) == 3 + 5 + 1
    assert grew("vllm:request_success_total", (("finished_reason", "length"), ("model_name", MODEL))) == 2
    assert grew("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", MODEL))) == 1
    assert grew("vllm:request_prompt_tokens_count", (("model_name", MODEL),)) == 3
    assert after[("vllm:kv_cache_usage_perc", (("model_name", MODEL),))] == 0  # idle: every block free
