"""Tool calls in model output: one parser per format, for a whole output and for a stream.

    hermes       Qwen2 / 2.5 / 3:  text <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> ...
    llama3_json  Llama 3.1 / 3.2:  [<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]
    mistral      Mistral v0.3:     text [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    json_calls   a grammar-forced output (tool_choice "required"): [{"name": ..., "parameters": {...}}, ...]

Every parser reduces the text so far to a `Split`: the content that is surely not part of a
call (text that may be the start of a call marker is held back), and the calls seen so far,
each with its name once that is complete and the raw text of its arguments as far as it goes.
`parse` takes the split of a whole output; `ToolCallStream` diffs successive splits into OpenAI
deltas (a call's index, id, type and name first, then fragments of its arguments), so the
streamed content and arguments add up to what `parse` returns for the same text.

A whole output whose call markers hold something that is not a call (malformed JSON, no name,
a cut-off call) is plain content, as in vLLM. A stream cannot take back a call whose name it
has sent; one that breaks later simply ends there.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

from lmq.json_scan import ScannedObject, scan_object, skip_ws

_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as the model wrote it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class PartialCall:
    name: str | None = None  # once the name's string is complete
    arguments: str = ""  # raw JSON text so far (only grows)
    started: bool = False  # the arguments' object has begun (or the call is done)
    done: bool = False  # the call's JSON is complete and valid

    @property
    def ready(self) -> bool:
        """Worth announcing: named, with arguments on the way (a JSON reply with a "name" key
        but no arguments is no call)."""
        return self.name is not None and (self.started or self.done)


@dataclass
class Split:
    content: str
    calls: list[PartialCall] = field(default_factory=list)
    broken: bool = False  # call markers around something that is no call


def _held_back(text: str, marker: str) -> str:
    """text without a suffix that may be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text


def _call(s: str, obj: ScannedObject) -> PartialCall | None:
    """The call an object scanned so far describes; None if it cannot be one."""
    if obj.broken:
        return None
    call = PartialCall()
    name = obj.fields.get("name")
    if name is not None and name[1] is not None:
        value = json.loads(s[name[0]:name[1]]) if s[name[0]] == '"' else None
        if not isinstance(value, str) or not value:
            return None
        call.name = value
    args = next((obj.fields[k] for k in _ARGUMENT_KEYS if k in obj.fields), None)
    if args is not None:
        start, end = args
        if s[start] == "{":
            call.arguments, call.started = s[start:end], True
        elif end is not None and s[start] == '"':  # arguments as a JSON string of JSON
            call.arguments, call.started = json.loads(s[start:end]), True
    if obj.end is None:
        return call
    if call.name is None or args is None:  # {"name": "Bob", "age": 42} is a JSON reply, not a call
        return None
    try:
        if not isinstance(json.loads(call.arguments), dict):
            return None
    except ValueError:
        return None
    call.done = True
    return call


def scan_calls(s: str, j: int, split: Split, separators: str, closer: str | None) -> int:
    """Scans call objects from s[j] on, separated by whitespace and `separators`, until `closer`
    (or the end); appends them to split.calls, sets split.broken on anything else. Returns the
    index after the last complete call (after the closer, when there is one)."""
    while True:
        j = skip_ws(s, j)
        while j < len(s) and s[j] in separators:
            j = skip_ws(s, j + 1)
        if j >= len(s):
            return j
        if closer is not None and s[j] == closer:
            return j + 1
        if s[j] != "{":
            split.broken = True
            return j
        obj = scan_object(s, j)
        call = _call(s, obj)
        if call is None:
            split.broken = True
            return j
        split.calls.append(call)
        if not call.done:
            return len(s)
        j = obj.end


class ToolParser:
    """Base: `split(text, final)`; `final` says no more text comes (nothing held back, and an
    unfinished call breaks the output)."""

    name = ""
    keep_special_tokens = False  # the call marker is a special token: decode with it

    def split(self, text: str, final: bool) -> Split:
        raise NotImplementedError

    def new_id(self) -> str:
        return f"call_{secrets.token_hex(12)}"

    def parse(self, text: str) -> ParsedOutput:
        split = self.split(text, final=True)
        calls = [c for c in split.calls if c.done]
        if split.broken or len(calls) != len(split.calls) or not calls:
            return ParsedOutput(text or None, [])
        return ParsedOutput(split.content if split.content.strip() else None,
                            [ToolCall(self.new_id(), c.name, c.arguments) for c in calls])


class HermesParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> Split:
        first = text.find(self.START)
        if first == -1:
            return Split(text if final else _held_back(text, self.START))
        split, pos = Split(text[:first]), first
        while (start := text.find(self.START, pos)) != -1:
            body = start + len(self.START)
            end = text.find(self.END, body)
            chunk = text[body:end] if end != -1 else text[body:]
            if not final and end == -1:
                chunk = _held_back(chunk, self.END)
            after = scan_calls(chunk, 0, split, "", None)
            if split.broken:
                return split
            if end == -1:
                if final and (not split.calls or not split.calls[-1].done):
                    split.broken = True
                break
            if skip_ws(chunk, after) != len(chunk) or not split.calls or not split.calls[-1].done:
                split.broken = True  # a closed tag around something else than one whole call
                return split
            pos = end + len(self.END)
        return split


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2 JSON tool calls: the output is the call, or text then <|python_tag|> and the
    call. The tag is a special token: outputs are decoded with special tokens (the end-of-turn
    tokens are stop tokens, never in the text), and a call without the tag must start the output."""

    name = "llama3_json"
    TAG = "<|python_tag|>"
    keep_special_tokens = True

    def split(self, text: str, final: bool) -> Split:
        tag = text.find(self.TAG)
        if tag != -1:
            split, start = Split(text[:tag]), tag + len(self.TAG)
        else:
            start = skip_ws(text, 0)
            if start == len(text):
                return Split(text if final else "")
            if text[start] != "{":
                return Split(text if final else _held_back(text, self.TAG))
            split = Split("")
        scan_calls(text, start, split, ";,", None)
        if final and not split.broken and (not split.calls or not split.calls[-1].done):
            split.broken = True
        return split


class MistralParser(ToolParser):
    """Mistral v0.3: [TOOL_CALLS] is a control token, so outputs are decoded with special tokens.
    Its template wants tool-call ids of 9 letters and digits."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    keep_special_tokens = True

    def split(self, text: str, final: bool) -> Split:
        tag = text.find(self.TAG)
        if tag == -1:
            return Split(text if final else _held_back(text, self.TAG))
        split = Split(text[:tag])
        _scan_array(text, tag + len(self.TAG), split, final)
        return split

    def new_id(self) -> str:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))


class JsonCallsParser(ToolParser):
    """The output a grammar forces for tool_choice "required": a JSON array of calls."""

    name = "json_calls"

    def split(self, text: str, final: bool) -> Split:
        split = Split("")
        _scan_array(text, 0, split, final)
        return split


def _scan_array(s: str, j: int, split: Split, final: bool) -> None:
    """`[call, call, ...]` (or calls without the brackets) from s[j] on."""
    j = skip_ws(s, j)
    if j >= len(s):
        split.broken = final
        return
    closed = s[j] == "["
    end = scan_calls(s, j + 1 if closed else j, split, ",", "]" if closed else None)
    if split.broken:
        return
    if final and (not split.calls or not split.calls[-1].done or (closed and s[end - 1:end] != "]")):
        split.broken = True


class NamedCallParser(ToolParser):
    """tool_choice naming a function: the grammar forces the output to be its arguments."""

    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def split(self, text: str, final: bool) -> Split:
        start = skip_ws(text, 0)
        if start == len(text):
            return Split("", broken=final)
        call = PartialCall(self.function, text[start:], started=True)
        if final:
            try:
                call.done = isinstance(json.loads(call.arguments), dict)
            except ValueError:
                pass
        return Split("", [call])


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for_template(template: str) -> str | None:
    """The parser a chat template's tool format calls for (None: no known format)."""
    if "<tool_call>" in template:
        return HermesParser.name
    if "[TOOL_CALLS]" in template:
        return MistralParser.name
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return Llama3JsonParser.name
    return None


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI delta.tool_calls items


class ToolCallStream:
    """One streamed choice: feed it the whole text so far, get what to send since last time."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser, self.max_calls = parser, max_calls  # max_calls=1: parallel_tool_calls=false
        self.sent_content = 0
        self.ids: list[str] = []  # one per announced call
        self.sent_args: list[int] = []
        self.fed = 0  # length of the longest text fed so far that was not broken
        self.broke = False

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, text: str, final: bool = False) -> StreamDelta:
        split = self.parser.split(text, final)
        if not split.broken:
            self.fed = len(text)
            return self._send(text, split, final)
        delta = StreamDelta()
        if not self.broke:
            # The text broke somewhere in what came since the last feed. A stream fed one
            # character at a time would have sent all of the longest prefix that does not break
            # (a call's name and the arguments up to the character that breaks them), so send
            # that first: what is streamed must not depend on where the chunks were cut.
            self.broke = True
            good = self._longest_unbroken(text)
            if good > self.fed:
                delta = self._send(text[:good], self.parser.split(text[:good], False), False)
        more = self._send(text, split, final)
        delta.content += more.content
        delta.tool_calls.extend(more.tool_calls)
        return delta

    def _longest_unbroken(self, text: str) -> int:
        """The longest prefix of text, fed as not final, that is not broken. Splits are monotone
        (once broken, every longer text is), and text[:self.fed] is not broken: a bisection."""
        lo, hi = self.fed, len(text) - 1  # text[:lo] unbroken; text[:hi + 1] broken (or final)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.parser.split(text[:mid], False).broken:
                hi = mid - 1
            else:
                lo = mid
        return lo

    def _send(self, text: str, split: Split, final: bool) -> StreamDelta:
        if final and split.broken and not self.ids:
            split = Split(text)  # nothing announced: the whole output is content, as parse() says
        delta = StreamDelta()
        if split.content.startswith(text[:self.sent_content]) and len(split.content) > self.sent_content:
            delta.content = split.content[self.sent_content:]
            self.sent_content = len(split.content)
        for i, call in enumerate(split.calls[:self.max_calls]):
            if not call.ready:
                break
            item: dict = {"index": i}
            if i == len(self.ids):
                self.ids.append(self.parser.new_id())
                self.sent_args.append(0)
                item.update(id=self.ids[i], type="function", function={"name": call.name, "arguments": ""})
            new = call.arguments[self.sent_args[i]:]
            if new:
                item.setdefault("function", {})["arguments"] = new
                self.sent_args[i] = len(call.arguments)
            if len(item) > 1:
                delta.tool_calls.append(item)
        return delta
