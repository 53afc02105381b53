"""OpenAI tools on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls`, tool
results and earlier calls in the messages; the output's calls as `tool_calls`.

    tool_choice    tools in the prompt    output parsed by                 enforced by
    "none"         yes (as vLLM)          nothing: plain content           -
    "auto"         yes                    the family's parser (hermes...)  -
    "required"     yes                    JsonCallsParser                  grammar: forced_schema()
    {function}     yes                    NamedCallParser                  grammar: forced_schema()

"required" and a named function are enforced by the structured-output grammar
(`GuidedDecodingParams` of lmq.structured), so the output always parses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from lmq.sampling import SamplingParams
from lmq.structured import GuidedDecodingParams, check_guided
from lmq.tool_parsers import PARSERS, JsonCallsParser, NamedCallParser, ToolCallStream, ToolParser, parser_for_template
from serve.errors import APIError

try:  # checks tools' parameters schemas when installed (the dev extra has it)
    import jsonschema
except ImportError:
    jsonschema = None


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict]  # OpenAI function tools, checked: {"type": "function", "function": {...}}
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the function tool_choice names
    parallel: bool = True

    def parameters(self, name: str) -> dict:
        tool = next(t for t in self.tools if t["function"]["name"] == name)
        return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def _check_tool(i: int, tool: object) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        got = tool.get("type") if isinstance(tool, dict) else tool
        raise _bad(f"{where}.type", f"only function tools are supported (type 'function'), got {got!r}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _bad(f"{where}.function", f"expected an object with a name, got {fn!r}")
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise _bad(f"{where}.function.name", f"must be 1-64 letters, digits, '_' or '-', got {name!r}")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _bad(f"{where}.function.parameters", f"must be a JSON schema object, got {params!r}")
        try:
            if jsonschema is not None:
                jsonschema.validators.validator_for(params).check_schema(params)
        except jsonschema.SchemaError as e:
            raise _bad(f"{where}.function.parameters", f"not a valid JSON schema: {e.message}") from None
    return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


def tool_request(tools: list | None, tool_choice: str | dict | None, parallel: bool | None) -> ToolRequest | None:
    """The request's tool fields, checked; None when it has no tools (and no tool_choice but "none")."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise _bad("tool_choice", f"tool_choice={tool_choice!r} needs tools, and the request has none")
        return None
    checked = [_check_tool(i, t) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise _bad("tools", f"function names must be unique, got {names}")
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        return ToolRequest(checked, tool_choice or "auto", parallel=parallel is not False)
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise _bad("tool_choice", "must be 'none', 'auto', 'required' or "
                   f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
    if name not in names:
        raise _bad("tool_choice", f"names function {name!r}, which is not in tools ({', '.join(names)})")
    return ToolRequest(checked, "function", name, parallel is not False)


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls as chat templates read them: arguments as objects, not JSON text
    (as vLLM passes them to HF templates)."""
    out = []
    for i, msg in enumerate(messages):
        calls = msg.get("tool_calls")
        if not calls:
            out.append(msg)
            continue
        if msg.get("role") != "assistant":
            raise _bad(f"messages[{i}].tool_calls",
                       f"only assistant messages carry tool calls, not {msg.get('role')!r} ones")
        rendered = []
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(where, f"expected {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}, "
                           f"got {call!r}")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError as e:
                raise _bad(f"{where}.function.arguments", f"not valid JSON ({e}): {args!r}") from None
            rendered.append({**call, "type": "function", "function": {**fn, "arguments": args}})
        out.append({**msg, "tool_calls": rendered})
    return out


def parser(tools: ToolRequest | None, template: str, configured: str | None) -> ToolParser | None:
    """The parser for this request's output (None: the output is plain content)."""
    if tools is None or tools.choice == "none":
        return None
    if tools.choice == "function":
        return NamedCallParser(tools.function)
    if tools.choice == "required":
        return JsonCallsParser()
    name = configured or parser_for_template(template)
    if name is None:
        raise _bad("tools", "the model's chat template writes tool calls in no format lmq knows; "
                   f"start the server with --tool-call-parser {{{'|'.join(PARSERS)}}}")
    return PARSERS[name]()


def forced_schema(tools: ToolRequest) -> dict | None:
    """The JSON schema the output must match (None: nothing forced): a named function's
    arguments, or for "required" an array of calls, one of the tools each (at most one unless
    parallel_tool_calls), in JsonCallsParser's format."""
    if tools.choice == "function":
        return tools.parameters(tools.function)
    if tools.choice != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                               "parameters": tools.parameters(t["function"]["name"])},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools.tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    return schema if tools.parallel else {**schema, "maxItems": 1}


def enforce(params: SamplingParams, tools: ToolRequest | None, tool_parser: ToolParser | None) -> SamplingParams:
    """The request's params with what its tools need: special tokens kept where the call marker
    is one, and for "required" / a named function the grammar of forced_schema() (a request has
    one grammar, so these cannot be combined with response_format or guided_*)."""
    if tool_parser is not None and tool_parser.keep_special_tokens:
        params = replace(params, skip_special_tokens=False)
    schema = forced_schema(tools) if tools is not None else None
    if schema is None:
        return params
    if params.guided_decoding is not None:
        raise _bad("tool_choice", f"tool_choice={_choice_name(tools)!r} forces a grammar, and so does "
                   f"{params.guided_decoding.field or 'guided_decoding'}: set one of the two")
    guided = GuidedDecodingParams(json=schema, field="tool_choice")
    try:
        check_guided(guided)
    except ValueError as e:  # a tool's parameters schema the grammar library cannot compile
        raise _bad("tools", f"the parameters of the forced tool(s) cannot be enforced: {e}") from None
    return replace(params, guided_decoding=guided)


def _choice_name(tools: ToolRequest) -> str:
    return tools.function if tools.choice == "function" else tools.choice


def message(text: str, tool_parser: ToolParser | None, parallel: bool, finish_reason: str | None
            ) -> tuple[dict, str | None]:
    """A whole output -> (the OpenAI assistant message, finish_reason)."""
    if tool_parser is None:
        return {"role": "assistant", "content": text}, finish_reason
    parsed = tool_parser.parse(text)
    calls = parsed.tool_calls if parallel else parsed.tool_calls[:1]
    if not calls:
        return {"role": "assistant", "content": parsed.content or ""}, finish_reason
    return ({"role": "assistant", "content": parsed.content, "tool_calls": [c.to_openai() for c in calls]},
            _finish(tool_parser, finish_reason))


def _finish(tool_parser: ToolParser, finish_reason: str | None) -> str | None:
    # OpenAI: "tool_calls" when the model chose to call; a forced named call ends with "stop".
    if finish_reason == "stop" and not isinstance(tool_parser, NamedCallParser):
        return "tool_calls"
    return finish_reason


def stream_finish(tool_parser: ToolParser | None, called: bool, finish_reason: str | None) -> str | None:
    return _finish(tool_parser, finish_reason) if tool_parser is not None and called else finish_reason


def prepare(tools: ToolRequest | None, tokenizer, configured: str | None) -> ToolParser | None:
    """Checks the model can take the request's tools; -> the parser of its output."""
    if tools is not None and not tokenizer.supports_tools:
        raise _bad("tools", "this model's chat template has no tool support (it never reads `tools`): "
                   "send the request without tools")
    return parser(tools, tokenizer.chat_template, configured)


class ChoiceStreams:
    """The tool-call streams of one streamed response, one per choice index."""

    def __init__(self, tool_parser: ToolParser, parallel: bool) -> None:
        self.tool_parser, self.max_calls = tool_parser, None if parallel else 1
        self.streams: dict[int, ToolCallStream] = {}

    def delta(self, idx: int, text: str, final: bool) -> dict:
        """The OpenAI delta for the choice's text so far ({} when there is nothing new to send)."""
        stream = self.streams.get(idx)
        if stream is None:
            stream = self.streams[idx] = ToolCallStream(self.tool_parser, self.max_calls)
        d = stream.feed(text, final)
        out: dict = {"content": d.content} if d.content else {}
        if d.tool_calls:
            out["tool_calls"] = d.tool_calls
        return out

    def finish_reason(self, idx: int, finish_reason: str | None) -> str | None:
        stream = self.streams.get(idx)
        return stream_finish(self.tool_parser, stream is not None and stream.called, finish_reason)
