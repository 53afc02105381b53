"""vLLM's prompt dicts (`vllm.inputs.TextPrompt` / `TokensPrompt`); `LLM.generate` takes them
beside plain strings and token id lists."""

from __future__ import annotations

from typing import Any, TypedDict


class _WithImages(TypedDict, total=False):
    multi_modal_data: dict[str, Any]  # {"image": a PIL image, a URL or a list of them}


class TextPrompt(_WithImages):
    prompt: str


class TokensPrompt(_WithImages):
    prompt_token_ids: list[int]


PromptType = str | list[int] | TextPrompt | TokensPrompt
