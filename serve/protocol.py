"""OpenAI (and vLLM's extra) request bodies, in pydantic.

Every field a request sends is either honoured or refused: an unknown field is a 400 naming it
(extra="forbid"), and a known field lmq cannot serve yet is a 400 saying why (`NOT_SUPPORTED`,
checked by `refuse_unsupported`). Values are checked again, with their allowed ranges, when
they become SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import APIError
from serve.structured_output import StructuredOutputFields


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; LLaVA towers see one fixed size


class ContentPart(_Strict):
    type: Literal["text", "image_url", "input_image", "image"]
    text: str | None = None
    image_url: ImageURL | str | None = None
    image: Any = None  # the payload of type "image", which template_messages refuses, naming the part


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # tools (serve/tool_calls.py checks them)
    tool_calls: list[dict] | None = None  # assistant: its earlier calls
    tool_call_id: str | None = None  # tool: which call this result answers


class StreamOptions(_Strict):
    include_usage: bool = False


# Known fields lmq cannot serve yet -> (why, the values that ask for nothing and so are honoured
# as they are). The one place to switch a feature on: drop its entry and handle the field.
NOT_SUPPORTED: dict[str, tuple[str, tuple[object, ...]]] = {
    "structural_tag": ("structured output is not supported yet", (None,)),
    "functions": ("tool calling is not supported yet", (None, [])),
    "function_call": ("tool calling is not supported yet", (None, "none")),
    "suffix": ("suffix (fill-in-the-middle) is not supported", (None, "")),
    "use_beam_search": ("beam search is not supported", (None, False)),
    "spaces_between_special_tokens": (
        "lmq decodes with the Rust (fast) tokenizer, which puts no spaces between special tokens; "
        "only false (that behaviour) is accepted", (None, False)),
}


def refuse_unsupported(req: BaseModel) -> None:
    """400 for the first field of NOT_SUPPORTED the request sets to something it asks for."""
    for name, (why, neutral) in NOT_SUPPORTED.items():
        value = getattr(req, name, None)
        if name in req.model_fields_set and not any(value == v and type(value) is type(v) for v in neutral):
            raise APIError(400, f"{name}={_short(value)} is not supported: {why}", param=name)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _SamplingFields(_Strict, StructuredOutputFields):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    best_of: int | None = None  # accepted when equal to n (no candidates are dropped)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (a string) -> bias in [-100, 100]
    min_tokens: int = 0
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: logged, nothing else
    return_tokens_as_token_ids: bool = False  # vLLM: logprob tokens as "token_id:<id>"
    # Known, refused with a reason (NOT_SUPPORTED) unless set to a value that asks for nothing.
    structural_tag: Any = None
    use_beam_search: Any = None
    spaces_between_special_tokens: Any = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens (wins over it)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the chat template
    # tools (serve/tool_calls.py checks them)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a raw `prompt`, or chat `messages` rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Strict):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: str
