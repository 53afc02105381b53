"""Random JSON schemas and regexes for structured-output tests and benchmarks.

Every schema is closed (additionalProperties false) and bounded (strings with maxLength, arrays
with maxItems, numbers with minimum/maximum). A number's fraction still has any number of
digits, and a random model at temperature 1 picks a digit over a value's end about ten times in
eleven, so one number in a few thousand runs past any token budget: tests of random models pass
`value_end_bias` as logit_bias, which makes a value's end likelier wherever the grammar allows
one (the grammar still decides what is allowed). Features drawn: nested objects, arrays with minItems/maxItems,
enums, integers and numbers with bounds, required and optional fields, strings with a pattern
or a maxLength, booleans.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_WORDS = ["id", "name", "size", "tags", "kind", "score", "ok", "items", "meta", "level", "color", "count"]
_ENUMS = [["red", "green", "blue"], ["a", "bb", "ccc"], [1, 2, 3], ["yes", "no"], [True, "maybe", 7]]
_PATTERNS = [r"[a-z]{1,4}", r"[0-9]{2}-[0-9]{2}", r"(ab|cd){1,3}x?", r"[A-Z][a-z]{0,3}"]


def value_end_bias(encode: Callable[[str], list[int]], bias: float = 4.0) -> dict[int, float]:
    """logit_bias favouring the tokens that end a JSON value or string (`"`, `,`, `}`, `]`).
    encode: text -> token ids without special tokens."""
    return {encode(c)[0]: bias for c in ('"', ",", "}", "]")}


def object_end_bias(encode: Callable[[str], list[int]]) -> dict[int, float]:
    """logit_bias for free-form JSON (json_object): there a `,` opens another member, so it is
    disfavoured and the closers favoured. Over 240 random-model draws at temperature 1 the longest
    object took 43 tokens (198 with +4 on `"` and +6 on the closers; 400+ with value_end_bias)."""
    return {encode('"')[0]: 6.0, encode("}")[0]: 6.0, encode("]")[0]: 6.0, encode(",")[0]: -2.0}


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose root is an object."""
    return _object(rng, depth)


def _object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(_WORDS, rng.randint(1, 3))
    props = {name: _value(rng, depth + 1) for name in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict:
    kinds = ["integer", "number", "string", "pattern", "enum", "boolean"]
    if depth < 3:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "number":
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 20)}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": "^" + rng.choice(_PATTERNS) + "$"}
    if kind == "enum":
        return {"enum": rng.choice(_ENUMS)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "object":
        return _object(rng, depth)
    lo = rng.randint(0, 2)
    return {"type": "array", "items": _value(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}


def random_regex(rng: random.Random) -> str:
    """A regex over a few alternations, classes and bounded repeats (no unbounded star)."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        atom = rng.choice([r"[a-z]", r"[0-9]", "(cat|dog|cow)", r"[A-F0-9]", "x", "-", r"\.", "(yes|no)"])
        lo = rng.randint(0, 2)
        parts.append(atom + rng.choice(["", "?", f"{{{lo},{lo + rng.randint(1, 3)}}}"]))
    return "".join(parts) or "a"
