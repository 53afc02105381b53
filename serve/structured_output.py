"""Structured-output request fields -> lmq's GuidedDecodingParams.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict"}}) and vLLM's `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` and `structured_outputs` ({"json" | "regex" | "choice" | "grammar": ...}), on
chat and completions alike. At most one of them may constrain a request. A grammar llguidance
cannot compile is a 400 whose `param` is the field it came from. JSON schemas are always
enforced strictly (`strict` is accepted either way).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmq.structured import GuidedDecodingParams, check_guided
from serve.errors import APIError


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(default=None, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputFields(BaseModel):
    """Mixed into the chat and completion request bodies."""

    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None


def _candidates(req: StructuredOutputFields) -> list[tuple[str, dict]]:
    """(field, GuidedDecodingParams keyword arguments) for every constraint the request sets."""
    out = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        out.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise APIError(400, 'response_format of type "json_schema" needs json_schema.schema (a JSON schema '
                           'object)', param="response_format.json_schema")
        out.append(("response_format.json_schema", {"json": rf.json_schema.json_schema}))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            out.append((name, {kind: getattr(req, name)}))
    if req.structured_outputs is not None:
        out.append(("structured_outputs", dict(req.structured_outputs)))
    return out


def guided_decoding(req: StructuredOutputFields) -> GuidedDecodingParams | None:
    """The request's constraint, compiled once to check it (400 naming the field if it cannot
    be); None for a free request."""
    found = _candidates(req)
    if not found:
        return None
    if len(found) > 1:
        names = [name for name, _ in found]
        raise APIError(400, f"set at most one structured-output field; this request sets {len(names)}: "
                       f"{', '.join(names)}", param=names[1])
    name, kwargs = found[0]
    try:
        guided = GuidedDecodingParams(**kwargs, field=name)
        check_guided(guided)
    except (TypeError, ValueError) as e:  # TypeError: an unknown key in structured_outputs
        raise APIError(400, str(e), param=name) from None
    return guided
