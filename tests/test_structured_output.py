"""Structured output: every constrained output parses and validates (jsonschema / re.fullmatch)
over fresh random JSON schemas and regexes, on random tiny models and the default model, in
batches mixed with free and adapter requests (whose outputs must not change), with n > 1,
preemption, aborts and max_tokens cut-offs; and through the server (openai client, streaming
and not), where a grammar that cannot compile is a 400 naming its field."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import httpx
import jsonschema
import openai
import pytest
import torch
from schema_fixtures import object_end_bias, random_regex, random_schema, value_end_bias

from conftest import SEED, random_prompts
from lmq import LLM, SamplingParams
from lmq.llm import build_engine_config
from lmq.structured import GuidedDecodingParams, check_guided
from serve.server import BackgroundServer, make_app

FREE = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
BUDGET = 400  # tokens: far more than a random model's bounded JSON takes


def _guided(kind: str, spec, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=BUDGET, guided_decoding=GuidedDecodingParams(**{kind: spec}),
                          **kw)


def _assert_valid(kind: str, spec, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(spec, text), (spec, text)
    elif kind == "choice":
        assert text in spec, (spec, text)
    else:
        jsonschema.validate(json.loads(text), spec)  # raises with the path of what is wrong


def _random_specs(rng: random.Random, n: int) -> list[tuple[str, object]]:
    return [("json", random_schema(rng)) if i % 2 == 0 else ("regex", random_regex(rng)) for i in range(n)]


# -- params and compile errors --------------------------------------------------------------------
def test_params_take_one_constraint_and_name_fields():
    with pytest.raises(ValueError, match="exactly one of"):
        GuidedDecodingParams(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="exactly one of"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="guided_decoding.json: the JSON schema is not valid JSON"):
        GuidedDecodingParams(json="{not json")
    with pytest.raises(ValueError, match="guided_decoding.choice"):
        GuidedDecodingParams(choice=[])
    as_dict = SamplingParams(guided_decoding={"regex": "[ab]+"})
    new_name = SamplingParams(structured_outputs=GuidedDecodingParams(regex="[ab]+"))
    assert as_dict.guided_decoding == new_name.guided_decoding and new_name.structured_outputs is None
    with pytest.raises(ValueError, match="two names for one thing"):
        SamplingParams(guided_decoding={"regex": "a"}, structured_outputs=GuidedDecodingParams(regex="b"))


@pytest.mark.parametrize("kwargs, words", [
    ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, ["Invalid type: strin"]),
    ({"regex": "(ab"}, ["unclosed group"]),
    ({"grammar": "root ::= undefined_rule"}, ["undefined_rule"]),
])
def test_a_grammar_that_cannot_compile_names_field_and_reason(kwargs, words):
    guided = GuidedDecodingParams(**kwargs, field="response_format.json_schema")
    with pytest.raises(ValueError) as err:
        check_guided(guided)
    assert str(err.value).startswith("response_format.json_schema: the grammar library (llguidance) cannot compile")
    assert all(w in str(err.value) for w in words)


def test_bitmask_masks_exactly_the_tokens_the_matchers_reject(tiny_models):
    llm = _llm(tiny_models["llama"])
    grammars = llm.engine.grammars()
    vocab = llm.engine.config.model.vocab_size
    rng = random.Random(SEED)
    specs = [GuidedDecodingParams(json=random_schema(rng)) for _ in range(3)]
    specs += [GuidedDecodingParams(regex=random_regex(rng)) for _ in range(3)]
    matchers = [grammars.matcher(g) for g in specs]
    for m in matchers[::2]:  # some a few tokens in
        for _ in range(2):
            allowed = [t for t in range(vocab) if m.validate_tokens([t]) == 1 and t != 2]  # 2: EOS
            if allowed:
                assert m.consume_token(rng.choice(allowed))
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(SEED))
    rows = [0, 2, 3, 5, 7, 8]
    ours = grammars.apply(logits, rows, grammars.fill(matchers))
    for r, m in zip(rows, matchers):  # the oracle: ask each matcher about each token
        ok = torch.tensor([m.validate_tokens([t]) == 1 for t in range(vocab)])
        ok[2] = m.is_accepting()  # EOS (2): allowed once the grammar accepts (alone once it stopped)
        assert (ok.any() or m.is_stopped()) and not ok[300:].any()  # ids past the tokenizer's ~300 are never allowed
        # Where the grammar forces the next bytes (after '{"' of a required key: 'items"'), the
        # mask keeps them in the tokenizer's canonical split: 'it' is allowed, 'i' is not, though
        # 'i' alone validates. So the tokens the mask drops beyond the oracle's are exactly the
        # proper prefixes of the forced bytes other than the canonical first token.
        forced, canonical = m.compute_ff_bytes(), m.compute_ff_tokens()[:1]
        split = torch.tensor([t not in canonical and len(b := grammars.tokenizer.decode_bytes([t])) < len(forced)
                              and forced.startswith(b) for t in range(vocab)])
        assert torch.equal(ours[r], logits[r].masked_fill(~ok | split, float("-inf")))
    untouched = [i for i in range(9) if i not in rows]
    assert torch.equal(ours[untouched], logits[untouched])


# -- the engine, on tiny models -------------------------------------------------------------------
def _llm(folder, **kw) -> LLM:
    return LLM(str(folder), device="cpu", dtype="float32", kv_cache_gb=0.05, **kw)


def _ends(llm: LLM) -> dict[int, float]:
    """A random model's numbers end within the budget (schema_fixtures.value_end_bias)."""
    return value_end_bias(lambda text: llm.tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def llm(tiny_models, lora_adapters) -> LLM:
    return _llm(tiny_models["llama"], adapters={k: lora_adapters[k] for k in ("qv4", "all8")})


def test_random_schemas_and_regexes_in_a_mixed_batch(llm):
    rng = random.Random(SEED)
    specs = _random_specs(rng, 24)
    free_prompts = random_prompts(6, [5, 9, 14], seed=SEED % 1000)
    adapters = [None, "qv4", "all8"]
    # Alone first: the free and adapter rows of the mixed batch must come out the same.
    alone = [llm.generate(p, FREE, adapter=adapters[i % 3])[0].outputs[0].token_ids
             for i, p in enumerate(free_prompts)]
    prompts, params, names = [], [], []
    for i, (kind, spec) in enumerate(specs):
        prompts.append(random_prompts(1, [4, 11], seed=SEED % 1000 + i)[0])
        params.append(_guided(kind, spec, n=2 if i % 5 == 0 else 1, seed=i if i % 3 == 0 else None,
                              logit_bias=_ends(llm)))
        names.append(adapters[i % 3])
    prompts += free_prompts
    params += [FREE] * len(free_prompts)
    names += [adapters[i % 3] for i in range(len(free_prompts))]
    outs = llm.generate(prompts, params, adapter=names)
    for (kind, spec), out in zip(specs, outs):
        assert len(out.outputs) == out.outputs[0].index + len(out.outputs)  # n samples came back
        for c in out.outputs:
            assert c.finish_reason == "stop", (spec, c.text)
            _assert_valid(kind, spec, c.text)
    assert [o.outputs[0].token_ids for o in outs[len(specs):]] == alone
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_choice_json_object_and_grammar(llm):
    choices = ["alpha", "beta gamma", 'quote "q"', "ünï"]
    ebnf = 'root ::= "(" [a-c]{1,3} ")" ("!" | "")'
    params = [_guided("choice", choices, seed=s) for s in range(6)]
    # Unbounded strings and members: a bias towards closing them keeps a random model's objects short.
    closers = object_end_bias(lambda t: llm.tokenizer.encode(t, add_special_tokens=False))
    params += [_guided("json_object", True, seed=s, logit_bias=closers) for s in range(4)]
    params += [_guided("grammar", ebnf, seed=s) for s in range(4)]
    outs = llm.generate([[5, 6, 7]] * len(params), params)
    texts = [o.outputs[0].text for o in outs]
    assert all(t in choices for t in texts[:6])
    assert all(isinstance(json.loads(t), dict) for t in texts[6:10])
    assert all(re.fullmatch(r"\([a-c]{1,3}\)!?", t) for t in texts[10:])
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)


def test_max_tokens_mid_json_is_length_and_min_tokens_defers_to_the_grammar(llm):
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"],
              "additionalProperties": False}
    cut = llm.generate([[5, 6, 7]] * 4, [_guided("json", schema, seed=s) for s in range(4)])
    short = llm.generate([[5, 6, 7]] * 4, [replace(_guided("json", schema, seed=s), max_tokens=3)
                                           for s in range(4)])
    for full, part in zip(cut, short):
        assert part.outputs[0].finish_reason == "length" and len(part.outputs[0].token_ids) == 3
        assert full.outputs[0].token_ids[:3] == part.outputs[0].token_ids  # same draws, cut short
    # min_tokens past where the grammar ends: the grammar wins (no EOS ban to leave nothing).
    out = llm.generate([5, 6, 7], _guided("choice", ["x"], min_tokens=5))[0].outputs[0]
    assert out.text == "x" and out.finish_reason == "stop"


def test_preemption_keeps_matchers_in_step(tiny_models):
    # 40 blocks of 8 tokens hold one request's full budget (30 + 290 tokens) but never all ten:
    # the prompts alone take 250 tokens, so the batch preempts while it decodes.
    llm = _llm(tiny_models["qwen2"], block_size=8, num_kv_blocks=40)
    rng = random.Random(SEED + 1)
    schemas = [random_schema(rng) for _ in range(10)]
    prompts = random_prompts(10, [20, 30], seed=SEED % 1000 + 7)
    # No whitespace between JSON tokens: outputs about half as long, within the small cache.
    params = [SamplingParams(temperature=1.0, max_tokens=290, seed=i, logit_bias=_ends(llm),
                             guided_decoding=GuidedDecodingParams(json=s, disable_any_whitespace=True))
              for i, s in enumerate(schemas)]
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for s, out in zip(schemas, outs):
        assert out.outputs[0].finish_reason == "stop"
        _assert_valid("json", s, out.outputs[0].text)


def test_abort_frees_blocks_and_matchers(llm):
    engine = llm.engine
    schema = {"type": "object", "properties": {"a_long_key": {"type": "string", "minLength": 20}},
              "required": ["a_long_key"]}  # 20 tokens at least: not finished after 3 steps
    engine.add_request("so-abort", [5, 6, 7, 8], _guided("json", schema, n=2))
    for _ in range(3):
        engine.step()
    seqs = list(engine.requests["so-abort"].seqs)
    assert len(seqs) == 2 and all(s.matcher is not None for s in seqs)
    engine.abort("so-abort")
    assert all(s.matcher is None and s.finish_reason == "abort" for s in seqs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_refuses_what_cannot_compile(llm):
    with pytest.raises(ValueError, match="guided_decoding.regex: the grammar library \\(llguidance\\)"):
        llm.generate([5, 6], _guided("regex", "[a-"))
    assert not llm.engine.has_unfinished()


# -- the default model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(None, device="cpu", kv_cache_gb=0.1, max_model_len=512)


def test_default_model_follows_choice_enum_and_number(default_llm):
    schema = {"type": "object", "properties": {"capital": {"enum": ["Paris", "Lyon", "Nice"]},
                                               "population_m": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["capital", "population_m"], "additionalProperties": False}
    q = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    specs = [("choice", ["Paris", "London", "Berlin"]), ("json", schema), ("regex", r"[A-Z][a-z]{1,8}")]
    params = [SamplingParams(temperature=0.0, max_tokens=40, guided_decoding=GuidedDecodingParams(**{k: v}))
              for k, v in specs]
    params.append(replace(params[1], temperature=0.8, seed=SEED, n=2))
    outs = [default_llm.chat(q, p)[0] for p in params]
    for (kind, spec), out in zip(specs + [specs[1]], outs):
        for c in out.outputs:
            assert c.finish_reason == "stop"
            _assert_valid(kind, spec, c.text)


# -- the server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_models):
    config = build_engine_config(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.05, max_model_len=512)
    srv = BackgroundServer(make_app(config, "tiny", (), None))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server_ends(tiny_models) -> dict[str, int]:
    """value_end_bias for the server's model, as a request's logit_bias."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    return {str(t): int(b) for t, b in value_end_bias(lambda text: tok.encode(text, add_special_tokens=False)).items()}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _chat_text(client, stream: bool, **extra) -> tuple[str, str]:
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "json please"}], "max_tokens": BUDGET,
          "temperature": 1.0, **extra}
    if not stream:
        c = client.chat.completions.create(**kw).choices[0]
        return c.message.content, c.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_server_response_format_and_guided_fields(client, server_ends, stream):
    rng = random.Random(SEED + (3 if stream else 4))
    for _ in range(4):
        schema = random_schema(rng)
        text, finish = _chat_text(client, stream, seed=rng.randrange(1000), logit_bias=server_ends, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        assert finish == "stop"
        _assert_valid("json", schema, text)
    text, finish = _chat_text(client, stream, response_format={"type": "json_object"})
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))
    text, _ = _chat_text(client, stream, response_format={"type": "text"}, max_tokens=5)  # free
    regex = random_regex(rng)
    c = client.completions.create(model="tiny", prompt="hi", max_tokens=BUDGET, stream=False,
                                  extra_body={"guided_regex": regex}).choices[0]
    assert re.fullmatch(regex, c.text) and c.finish_reason == "stop"
    text, _ = _chat_text(client, stream, extra_body={"guided_choice": ["up", "down"]})
    assert text in ("up", "down")
    schema = random_schema(rng)
    text, _ = _chat_text(client, stream, logit_bias=server_ends, extra_body={"guided_json": schema})
    _assert_valid("json", schema, text)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema", ["cannot compile", "nope"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["needs json_schema.schema"]),
    ({"guided_regex": "(unclosed"}, "guided_regex", ["unclosed group"]),
    ({"guided_json": "{oops"}, "guided_json", ["not valid JSON"]),
    ({"guided_choice": []}, "guided_choice", ["non-empty"]),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", ["at most one", "guided_regex"]),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", ["jsn"]),
])
def test_server_bad_grammar_is_400_naming_the_param(server, body, param, words):
    for path, base in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(server.url + path, json={"model": "tiny", **base, **body}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and all(w in err["message"] for w in words), err
