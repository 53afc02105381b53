"""Tool calling (issue 17): each family's tool-call format parsed whole and streamed, its chat
template rendering tools, calls and results, and tool calls through the real server with the
official openai client, made by tiny models that greedily write a family's tool call
(tests/tool_fixtures.py)."""

from __future__ import annotations

import itertools
import json
import random

import httpx
import jsonschema
import openai
import pytest
from tool_fixtures import FAMILIES, make_family_tokenizer, make_scripted_model

from conftest import SEED
from lmq.llm import build_engine_config
from lmq.tokenizer import Tokenizer
from lmq.tool_parsers import (
    PARSERS,
    JsonCallsParser,
    NamedCallParser,
    ParsedOutput,
    ToolCallStream,
    ToolParser,
    parser_for_template,
)
from serve.server import BackgroundServer, make_app
from serve.tool_calls import ToolRequest, forced_schema, tool_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PARIS = {"city": "Paris", "unit": "celsius"}
TZ = {"timezone": "Europe/Paris"}

# Outputs as the models write them: (parser, text, content, [(name, arguments)]).
OUTPUTS = {
    "hermes": ("hermes", 'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": '
               '"Europe/Paris"}}\n</tool_call>', "Let me look that up.\n", [("get_weather", PARIS), ("get_time", TZ)]),
    "hermes-qwen3-no-text": ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'
                             "\n</tool_call>", None, [("get_time", TZ)]),
    "hermes-tricky-strings": ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par}is\\" '
                              '{<tool_call>"}}\n</tool_call>', None,
                              [("get_weather", {"city": 'Par}is" {<tool_call>'})]),
    "llama3-tag": ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
                   '"unit": "celsius"}}', None, [("get_weather", PARIS)]),
    "llama3-plain-two": ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                         '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None,
                         [("get_weather", PARIS), ("get_time", TZ)]),
    "llama3-text-then-tag": ("llama3_json", 'Checking.<|python_tag|>{"name": "get_time", "parameters": '
                             '{"timezone": "Europe/Paris"}}', "Checking.", [("get_time", TZ)]),
    "mistral": ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', None,
                [("get_weather", PARIS), ("get_time", TZ)]),
    "mistral-text-before": ("mistral", 'Sure.[TOOL_CALLS][{"name":"get_time","arguments":{"timezone":"Europe/Paris"}}]',
                            "Sure.", [("get_time", TZ)]),
}
# Outputs that hold no call: the whole text is content. A stream that has announced a call
# before the text broke cannot take it back: (content streamed, arguments streamed at most),
# which are always a prefix of valid JSON, never the character that broke it.
PLAIN = [
    ("hermes", "The weather in Paris is mild, no <tool> needed.", None),
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',
     ("Sure.\n", '{"city": "Par')),  # a raw newline in a string
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>", None),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', None),  # no name
    ("hermes", "Ends with half a marker <tool_ca", None),
    ("llama3_json", "Paris is sunny today.", None),
    ("llama3_json", '{"answer": 42, "note": "a JSON reply, not a call"}', None),
    ("llama3_json", '{"name": "Bob", "age": 42}', None),  # a name but no arguments: no call
    ("llama3_json", '{"name": "get_weather", "parameters": [1, 2]}', None),  # arguments not an object
    ("llama3_json", "   ", None),
    ("mistral", "No tools needed: it is 18 degrees. [TOOL", None),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": }]', ("", '{"city": ')),
    ("mistral", "[TOOL_CALLS] what", None),
]


def _stream(parser: ToolParser, text: str, cuts: list[int]) -> tuple[str, list[dict]]:
    """Feeds text cut at `cuts` as a stream; -> (content, calls rebuilt from the deltas), with
    the OpenAI delta contract checked: a call's first delta has its index, id, type and name."""
    stream, content, calls = ToolCallStream(parser), "", []
    bounds = [*cuts, len(text)]
    for k, end in enumerate(bounds):
        delta = stream.feed(text[:end], final=k == len(bounds) - 1)
        content += delta.content
        for item in delta.tool_calls:
            i, fn = item["index"], item.get("function", {})
            if i == len(calls):
                assert item["id"] and item["type"] == "function" and fn["name"], item
                calls.append({"id": item["id"], "name": fn["name"], "arguments": ""})
            else:
                assert "id" not in item and "name" not in fn, f"call {i} announced twice: {item}"
            calls[i]["arguments"] += fn.get("arguments", "")
    return content, calls


def _cut_points(text: str, how: str) -> list[int]:
    if how == "chars":
        return list(range(1, len(text)))
    rng = random.Random(SEED)
    return sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 7)))


@pytest.mark.parametrize("case", OUTPUTS)
def test_parse_whole_output(case):
    name, text, content, calls = OUTPUTS[case]
    out = PARSERS[name]().parse(text)
    assert out.content == content
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls
    assert len({c.id for c in out.tool_calls}) == len(calls)
    for c in out.tool_calls:
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


@pytest.mark.parametrize("how", ["chars", "chunks"])
@pytest.mark.parametrize("case", OUTPUTS)
def test_stream_adds_up_to_the_whole_parse(case, how):
    name, text, content, calls = OUTPUTS[case]
    parser = PARSERS[name]()
    got_content, got = _stream(parser, text, _cut_points(text, how))
    whole = parser.parse(text)
    assert got_content == (content or "")
    assert [(c["name"], c["arguments"]) for c in got] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_stream_sends_names_first_then_argument_fragments():
    _, text, _, _ = OUTPUTS["hermes"]
    stream = ToolCallStream(PARSERS["hermes"]())
    sends = [stream.feed(text[:end]) for end in range(1, len(text) + 1)]
    first = next(i for i, d in enumerate(sends) if d.tool_calls)
    announced = sends[first].tool_calls[0]  # with the arguments' first characters, once they begin
    assert announced["function"] == {"name": "get_weather", "arguments": "{"} and announced["index"] == 0
    fragments = [item["function"]["arguments"] for d in sends[first:] for item in d.tool_calls
                 if item["index"] == 0 and item["function"].get("arguments")]
    assert len(fragments) > 10 and "".join(fragments) == json.dumps(PARIS)
    held = [d.content for d in sends if d.content]
    assert "".join(held) == "Let me look that up.\n" and "<" not in "".join(held)


def _every_cut(text: str) -> list[list[int]]:
    """Every chunking of text into two or three pieces: a bug that hangs on where a chunk
    boundary falls cannot hide behind the seed of _cut_points."""
    return [list(c) for r in (1, 2) for c in itertools.combinations(range(1, len(text)), r)]


def _streamed(parser: ToolParser, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    content, calls = _stream(parser, text, cuts)
    return content, [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("name, text, broken", PLAIN)
def test_no_call_is_plain_content_streamed_or_not(name, text, broken):
    parser = PARSERS[name]()
    assert parser.parse(text) == ParsedOutput(text or None, [])
    for cuts in [_cut_points(text, "chars"), _cut_points(text, "chunks"), *_every_cut(text)]:
        content, calls = _stream(parser, text, cuts)
        if broken is None:
            assert content == text and calls == []
        else:
            assert content == broken[0] and len(calls) == 1 and broken[1].startswith(calls[0]["arguments"])
            assert calls[0]["name"] == "get_weather"


@pytest.mark.parametrize("name, text", [(name, text) for name, text, _ in PLAIN])
def test_broken_output_streams_the_same_however_it_is_cut(name, text):
    """What a stream sends of an output that breaks (its content, a call it announced before the
    character that broke it) is what a stream of one character at a time sends."""
    parser = PARSERS[name]()
    by_chars = _streamed(parser, text, _cut_points(text, "chars"))
    for cuts in _every_cut(text):
        assert _streamed(parser, text, cuts) == by_chars, cuts


@pytest.mark.parametrize("case", OUTPUTS)
def test_stream_adds_up_to_the_whole_parse_for_every_single_cut(case):
    name, text, _, _ = OUTPUTS[case]
    parser = PARSERS[name]()
    whole = parser.parse(text)
    expected = (whole.content or "", [(c.name, c.arguments) for c in whole.tool_calls])
    for cut in range(1, len(text)):
        assert _streamed(parser, text, [cut]) == expected, cut


@pytest.mark.parametrize("name, text", [(name, text) for name, text, _ in PLAIN]
                         + [(name, text) for name, text, _, _ in OUTPUTS.values()])
def test_a_split_once_broken_stays_broken(name, text):
    """Streams rely on it: a text that cannot be a call can never become one as more text comes."""
    parser = PARSERS[name]()
    broken = [parser.split(text[:end], False).broken for end in range(len(text) + 1)]
    assert broken == sorted(broken), broken.index(True)


def test_numbers_in_arguments_stream_whole():
    """"1." and "1e" are numbers on their way, not a number and a character that breaks JSON."""
    args = '{"lat": 48.8566, "lon": 2.35, "alt": 3.5e1, "t": -1E-2, "ok": true, "n": null}'
    text = '<tool_call>\n{"name": "locate", "arguments": ' + args + "}\n</tool_call>"
    parser = PARSERS["hermes"]()
    assert [(c.name, c.arguments) for c in parser.parse(text).tool_calls] == [("locate", args)]
    assert not any(parser.split(text[:end], False).broken for end in range(len(text) + 1))
    for cuts in (_cut_points(text, "chars"), _cut_points(text, "chunks")):
        assert _streamed(parser, text, cuts) == ("", [("locate", args)])
    for bad in ('{"x": 1.}', '{"x": 1e}', '{"x": -}', '{"x": 1.e5}', '{"x": tru}', '{"x": 12a}'):
        assert parser.parse(f'<tool_call>{{"name": "f", "arguments": {bad}}}</tool_call>').tool_calls == []


def test_parallel_tool_calls_false_streams_one_call():
    _, text, _, _ = OUTPUTS["mistral"]
    stream = ToolCallStream(PARSERS["mistral"](), max_calls=1)
    items = [i for end in range(1, len(text) + 1) for i in stream.feed(text[:end], end == len(text)).tool_calls]
    assert {i["index"] for i in items} == {0}


def test_mistral_ids_are_nine_letters_or_digits():
    out = PARSERS["mistral"]().parse(OUTPUTS["mistral"][1])
    assert all(len(c.id) == 9 and c.id.isalnum() for c in out.tool_calls)


# -- tool_choice "required" / named: the schema a grammar enforces, and the parsers of its output --
def test_forced_schema_for_required_and_named():
    tools = tool_request(TOOLS, "required", None)
    schema = forced_schema(tools)
    good = [{"name": "get_weather", "parameters": PARIS}, {"name": "get_time", "parameters": TZ}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": TZ}], [{"name": "nope", "parameters": {}}],
                [{"name": "get_time"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = forced_schema(tool_request(TOOLS, "required", False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, one)
    jsonschema.validate(good[:1], one)
    named = tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None)
    assert forced_schema(named) == SCHEMAS["get_time"]
    assert forced_schema(tool_request(TOOLS, "auto", None)) is None

    text = json.dumps(good)  # what the grammar lets through, parsed back into the calls
    out = JsonCallsParser().parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("get_weather", PARIS), ("get_time", TZ)]
    assert _stream(JsonCallsParser(), text, _cut_points(text, "chars"))[1][1]["arguments"] == json.dumps(TZ)
    args = json.dumps(TZ)
    assert NamedCallParser("get_time").parse(args).tool_calls[0].arguments == args
    assert [(c["name"], c["arguments"]) for c in _stream(NamedCallParser("get_time"), args,
                                                         _cut_points(args, "chars"))[1]] == [("get_time", args)]


@pytest.mark.parametrize("tools, choice, words, param", [
    ([{"type": "retrieval"}], None, ["only function tools"], "tools[0].type"),
    ([{"type": "function", "function": {"name": "a b"}}], None, ["1-64 letters"], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None,
     ["not a valid JSON schema"], "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, ["unique"], "tools"),
    (None, "required", ["needs tools"], "tool_choice"),
    (TOOLS, "sometimes", ["must be 'none', 'auto', 'required'"], "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, ["'nope'", "get_weather, get_time"], "tool_choice"),
])
def test_bad_tool_fields_name_the_field(tools, choice, words, param):
    from serve.errors import APIError

    with pytest.raises(APIError) as e:
        tool_request(tools, choice, None)
    assert e.value.status == 400 and e.value.param == param
    assert all(w in e.value.message for w in words), e.value.message


# -- chat templates ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("tool_tokenizers")
    out = {}
    for family in FAMILIES:
        make_family_tokenizer(root / family, family)
        out[family] = Tokenizer(str(root / family))
    return out


CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "Ab3dE6gH9", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}]},
    {"role": "tool", "tool_call_id": "Ab3dE6gH9", "content": '{"temperature": 18}'},
]


@pytest.mark.parametrize("family, parser, marks", [
    ("qwen2.5", "hermes", ["<tools>\n" + json.dumps(WEATHER), '<tool_call>\n{"name": "get_weather", "arguments": '
                           + json.dumps(PARIS) + "}\n</tool_call>", '<tool_response>\n{"temperature": 18}\n']),
    ("llama3.1", "llama3_json", ["Environment: ipython", json.dumps(WEATHER, indent=4),
                                 '{"name": "get_weather", "parameters": ' + json.dumps(PARIS) + "}",
                                 "<|start_header_id|>ipython<|end_header_id|>\n\n"
                                 + json.dumps('{"temperature": 18}')]),
    ("mistral-v0.3", "mistral", ['[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "get_weather"',
                                 '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + json.dumps(PARIS)
                                 + ', "id": "Ab3dE6gH9"}]', '[TOOL_RESULTS] {"content": {"temperature": 18}, '
                                 '"call_id": "Ab3dE6gH9"}[/TOOL_RESULTS]']),
])
def test_family_templates_render_tools_calls_and_results(family_tokenizers, family, parser, marks):
    tok = family_tokenizers[family]
    assert tok.supports_tools and parser_for_template(tok.chat_template) == parser
    text = tok.hf.decode(tok.apply_chat_template(CONVERSATION, tools=TOOLS), skip_special_tokens=False)
    for mark in marks:
        assert mark in text, f"{mark!r} not in the prompt:\n{text}"
    plain = tok.hf.decode(tok.apply_chat_template(CONVERSATION[:1]), skip_special_tokens=False)
    assert "get_weather" not in plain and "What is the weather in Paris?" in plain


def test_template_without_tools_does_not_support_them(tiny_models):
    tok = Tokenizer(str(tiny_models["llama"]))  # conftest's ChatML template ignores tools
    assert not tok.supports_tools and parser_for_template(tok.chat_template) is None


# -- through the server ---------------------------------------------------------------------------
# What each scripted model writes: pieces are tokens, so a stream gets them one by one.
SCRIPTS = {
    "qwen2.5": ("I will check.", "\n<tool_call>", '\n{"na', 'me": "get_', 'weather", "argu', 'ments": {"ci',
                'ty": "Par', 'is", "unit": "cel', 'sius"}}', "\n</tool_call>", "\n<tool_call>\n",
                '{"name": "get_time", ', '"arguments": {"timezone": ', '"Europe/Paris"}}\n', "</tool_call>"),
    "llama3.1": ("<|python_tag|>", '{"name": "get_', 'weather", "param', 'eters": {"city": "Pa', 'ris", "unit": ',
                 '"celsius"}}'),
    "mistral-v0.3": ("[TOOL_CALLS]", ' [{"name": "get_weather", ', '"arguments": {"city', '": "Paris", "unit": "cel',
                     'sius"}}, ', '{"name": "get_time", "arguments": ', '{"timezone": "Europe/Paris"}}]'),
}
EXPECTED = {"qwen2.5": ("I will check.\n", [("get_weather", PARIS), ("get_time", TZ)]),
            "llama3.1": (None, [("get_weather", PARIS)]),
            "mistral-v0.3": (None, [("get_weather", PARIS), ("get_time", TZ)])}
ASK = [{"role": "user", "content": "What is the weather and the time in Paris?"}]


@pytest.fixture(scope="module", params=list(SCRIPTS))
def family_server(request, tmp_path_factory):
    family = request.param
    folder = make_scripted_model(tmp_path_factory.mktemp(family), family, SCRIPTS[family])
    config = build_engine_config(str(folder), device="cpu", kv_cache_gb=0.1, max_model_len=4096)
    srv = BackgroundServer(make_app(config, "tiny"))
    yield family, srv
    srv.stop()


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _check_calls(family: str, calls: list[tuple[str, str]]) -> None:
    assert [(n, json.loads(a)) for n, a in calls] == EXPECTED[family][1]
    for name, args in calls:
        jsonschema.validate(json.loads(args), SCHEMAS[name])


def test_tool_calls_come_back_as_tool_calls(family_server):
    family, srv = family_server
    r = _client(srv).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == EXPECTED[family][0]
    calls = choice.message.tool_calls
    assert all(c.type == "function" and c.id for c in calls) and len({c.id for c in calls}) == len(calls)
    _check_calls(family, [(c.function.name, c.function.arguments) for c in calls])
    if family == "mistral-v0.3":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # what its template demands back
    one = _client(srv).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0, max_tokens=40,
                                               parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_calls_stream_as_deltas(family_server):
    family, srv = family_server
    stream = _client(srv).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                                  max_tokens=40, stream=True)
    content, calls, finish, arg_chunks = "", {}, None, 0
    for chunk in stream:
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.function.name, ""]
            else:
                assert tc.id is None and tc.function.name is None
            if tc.function and tc.function.arguments:
                calls[tc.index][1] += tc.function.arguments
                arg_chunks += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and (content or None) == EXPECTED[family][0]
    # every call's arguments arrive, in fragments as the model writes them while the client keeps
    # up; a reader that falls behind gets the newest cumulative output (lmq.async_engine), so on a
    # loaded machine one chunk may carry a whole call's arguments. The fragments themselves are
    # checked where timing cannot merge them: test_stream_sends_names_first_then_argument_fragments.
    assert arg_chunks >= len(calls)
    _check_calls(family, [tuple(calls[i]) for i in sorted(calls)])


def test_tool_choice_none_is_plain_text(family_server):
    family, srv = family_server
    r = _client(srv).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                             temperature=0, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "stop" and not c.message.tool_calls
    shown = [p for p in SCRIPTS[family] if p not in FAMILIES[family].specials]  # decoded without them
    assert c.message.content == "".join(shown)


def test_tool_results_in_the_conversation_render(family_server):
    family, srv = family_server
    messages = list(CONVERSATION)  # the model answers the tool's result
    messages[1] = {**messages[1], "content": None, "tool_calls": [
        {"id": "Ab3dE6gH9", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(PARIS)}}]}
    r = _client(srv).chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0,
                                             max_tokens=40)
    assert r.choices[0].message.tool_calls and r.usage.prompt_tokens > 50


# Forced calls: the grammar writes them whatever the model prefers, so the tools' parameters are
# bounded (enums, no free strings) for a sampled random walk through them to end within budget.
# "required" still leaves the number of calls free: measured over 30 seeds per family, a call
# takes about 55 tokens and another follows about half the time (at most 7 calls, 434 tokens),
# so FORCED_BUDGET ends one short of its tokens about once in 2**27.
FORCED_BUDGET = 1500
BOUNDED = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"timezone": {"enum": ["UTC", "Europe/Paris"]},
                                         "dst": {"type": "boolean"}},
        "required": ["timezone", "dst"], "additionalProperties": False}}},
]
BOUNDED_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED}


def _forced(srv, choice, stream: bool, seed: int, **kw) -> tuple[list[tuple[str, str]], str, str | None]:
    """One forced-choice request -> ([(name, arguments)], finish_reason, content)."""
    args = dict(model="tiny", messages=ASK, tools=BOUNDED, tool_choice=choice, temperature=1.0, seed=seed,
                max_tokens=FORCED_BUDGET, **kw)
    if not stream:
        c = _client(srv).chat.completions.create(**args).choices[0]
        return ([(t.function.name, t.function.arguments) for t in c.message.tool_calls or ()], c.finish_reason,
                c.message.content)
    calls, finish, content = {}, None, ""
    for chunk in _client(srv).chat.completions.create(**args, stream=True):
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            calls.setdefault(tc.index, [tc.function.name, ""])[1] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish, content or None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_required_choice_is_enforced_by_the_grammar(family_server, stream):
    _, srv = family_server
    rng = random.Random(SEED)
    for parallel in (None, False):
        calls, finish, content = _forced(srv, "required", stream, rng.randrange(2**31), parallel_tool_calls=parallel)
        assert finish == "tool_calls" and calls and not content, (calls, finish, content)
        if parallel is False:
            assert len(calls) == 1
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), BOUNDED_SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_named_choice_calls_exactly_that_function(family_server, stream):
    _, srv = family_server
    rng = random.Random(SEED + 1)
    for name in BOUNDED_SCHEMAS:
        choice = {"type": "function", "function": {"name": name}}
        calls, finish, content = _forced(srv, choice, stream, rng.randrange(2**31))
        assert finish == "stop" and [n for n, _ in calls] == [name] and not content, (calls, finish, content)
        jsonschema.validate(json.loads(calls[0][1]), BOUNDED_SCHEMAS[name])


def test_forced_choice_and_a_second_grammar_is_a_400(family_server):
    _, srv = family_server
    body = {"model": "tiny", "messages": ASK, "tools": BOUNDED, "tool_choice": "required",
            "response_format": {"type": "json_object"}}
    resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "tool_choice" and "response_format" in err["message"], err


def test_http_400s_for_tools(family_server, tiny_models):
    _, srv = family_server
    bad_args = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "Ab3dE6gH9", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]
    for body, param in (({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
                        ({"tools": "get_weather"}, "tools"),
                        ({"tools": TOOLS, "messages": bad_args}, "messages[1].tool_calls[0].function.arguments")):
        resp = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body}, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_configured_parser_overrides_the_template(tmp_path):
    # `lmq serve --tool-call-parser llama3_json` on a model whose template writes hermes calls:
    # the configured parser reads the output, so the hermes call stays plain content
    folder = make_scripted_model(tmp_path, "qwen2.5", SCRIPTS["qwen2.5"])
    config = build_engine_config(str(folder), device="cpu", kv_cache_gb=0.1, max_model_len=2048)
    srv = BackgroundServer(make_app(config, "tiny", tool_call_parser="llama3_json"))
    try:
        c = _client(srv).chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                                 max_tokens=40).choices[0]
    finally:
        srv.stop()
    assert c.finish_reason == "stop" and not c.message.tool_calls
    assert c.message.content.startswith(EXPECTED["qwen2.5"][0]) and '"get_weather"' in c.message.content


def test_model_without_tool_template_refuses_tools(tiny_models):
    config = build_engine_config(str(tiny_models["llama"]), device="cpu", kv_cache_gb=0.05, max_model_len=256)
    srv = BackgroundServer(make_app(config, "tiny"))
    try:
        resp = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, "tools": TOOLS},
                          timeout=30)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == "tools" and "no tool support" in err["message"]
        ok = _client(srv).chat.completions.create(model="tiny", messages=ASK, max_tokens=3, tool_choice="none")
        assert ok.choices[0].message.tool_calls is None
    finally:
        srv.stop()


def test_tool_request_defaults():
    assert tool_request(None, None, None) is None and tool_request([], "none", None) is None
    assert tool_request(TOOLS, None, None) == ToolRequest(tool_request(TOOLS, "auto", None).tools, "auto")


def test_offline_chat_renders_tools_and_its_output_parses(tmp_path):
    from lmq import LLM, SamplingParams

    folder = make_scripted_model(tmp_path / "qwen", "qwen2.5", SCRIPTS["qwen2.5"])
    llm = LLM(str(folder), device="cpu", kv_cache_gb=0.05, max_model_len=2048)
    out = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=40), tools=TOOLS)[0]
    assert json.dumps(WEATHER) in llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    parsed = PARSERS[parser_for_template(llm.tokenizer.chat_template)]().parse(out.outputs[0].text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == EXPECTED["qwen2.5"][1]
