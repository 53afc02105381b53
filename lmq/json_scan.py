"""An incremental scanner for the JSON objects of tool calls: where each top-level key's value
starts and ends in text that may stop anywhere (a stream), without parsing the values.

    {"name": "get_weather", "arguments": {"city": "Par
     ^key    ^name value    ^key         ^arguments value: starts here, not ended yet

`scan_object` says which values are complete, which one the text ends in, and whether the text
can no longer be a JSON object (`broken`), as soon as the first character that breaks it
arrives: a stream then never sends that character. Complete values are still checked by
`json.loads` (the scanner does not check escapes or number syntax in full)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"
_LITERAL = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null")
# What a literal's first characters can be: every prefix of a _LITERAL match, nothing else.
_PARTIAL_LITERAL = re.compile(r"-?(\d+(\.\d*)?|\d+(\.\d+)?[eE][-+]?\d*)?|t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?")
_LITERAL_CHARS = frozenset("-+.0123456789eEtrufalsn")


class _Broken(Exception):
    pass


@dataclass
class ScannedObject:
    """fields: key -> (value start, value end or None while the text ends inside the value)."""

    start: int
    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # one past the closing brace, once there
    broken: bool = False  # the text cannot continue into a JSON object


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WHITESPACE:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """s[i] == '"': one past the closing quote, or None if the text ends inside the string."""
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        if c < " ":  # JSON strings hold no raw control characters (a newline must be \\n)
            raise _Broken
        j += 1
    return None


def _container_end(s: str, i: int) -> int | None:
    """s[i] in '{[': one past its closing bracket, or None; raises _Broken on what JSON never has."""
    is_object, close = s[i] == "{", "}" if s[i] == "{" else "]"
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == close:
        return j + 1
    while j < len(s):
        if is_object:
            if s[j] != '"':
                raise _Broken
            key_end = _string_end(s, j)
            if key_end is None:
                return None
            j = skip_ws(s, key_end)
            if j >= len(s):
                return None
            if s[j] != ":":
                raise _Broken
            j = skip_ws(s, j + 1)
            if j >= len(s):
                return None
        end = value_end(s, j)
        if end is None:
            return None
        j = skip_ws(s, end)
        if j >= len(s):
            return None
        if s[j] == close:
            return j + 1
        if s[j] != ",":
            raise _Broken
        j = skip_ws(s, j + 1)
    return None


def value_end(s: str, i: int) -> int | None:
    """One past the JSON value starting at s[i], None if the text ends inside it; raises
    _Broken as soon as the text can no longer be a JSON value."""
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        return _container_end(s, i)
    # A literal runs to the first character no literal has: "1." or "1e" is a number on its
    # way ("1.5", "1e5"), not the number 1 and a stray character.
    j = i
    while j < len(s) and s[j] in _LITERAL_CHARS:
        j += 1
    if j == len(s):  # a number may go on while the text ends right after it
        if _PARTIAL_LITERAL.fullmatch(s, i):
            return None
        raise _Broken
    if _LITERAL.fullmatch(s, i, j):
        return j
    raise _Broken


def scan_object(s: str, i: int) -> ScannedObject:
    """s[i] == '{'. Scans the object's top-level keys as far as the text goes."""
    obj = ScannedObject(i)
    try:
        _scan_fields(s, obj)
    except _Broken:
        obj.broken = True
    return obj


def _scan_fields(s: str, obj: ScannedObject) -> None:
    j = skip_ws(s, obj.start + 1)
    if j < len(s) and s[j] == "}":
        obj.end = j + 1
        return
    while j < len(s):
        if s[j] != '"':
            raise _Broken
        key_end = _string_end(s, j)
        if key_end is None:
            return
        key = s[j + 1:key_end - 1]
        j = skip_ws(s, key_end)
        if j >= len(s):
            return
        if s[j] != ":":
            raise _Broken
        j = skip_ws(s, j + 1)
        if j >= len(s):
            return
        end = value_end(s, j)
        obj.fields[key] = (j, end)
        if end is None:
            return
        j = skip_ws(s, end)
        if j >= len(s):
            return
        if s[j] == "}":
            obj.end = j + 1
            return
        if s[j] != ",":
            raise _Broken
        j = skip_ws(s, j + 1)
