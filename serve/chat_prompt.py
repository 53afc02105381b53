"""Chat messages -> the prompt's token ids, through the served model's chat template (for
/v1/chat/completions and /tokenize): messages checked against the route, template arguments
and variables checked, the template's own refusals turned into 400s."""

from __future__ import annotations

from lmq.chat_content import ImageRef, template_messages
from serve.errors import APIError
from serve.protocol import ChatMessage
from serve.router import Route

# apply_chat_template's own arguments: not for chat_template_kwargs to override.
_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                            "chat_template", "tools", "documents", "return_dict", "return_tensors", "padding",
                            "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
                            "sanitize_control_tokens"})


def chat_messages(messages: list[ChatMessage], route: Route) -> tuple[list[dict], list[ImageRef]]:
    """Messages for the chat template and the images they carry, checked against the route."""
    try:
        out, refs = template_messages([m.model_dump(exclude_none=True) for m in messages])
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    if refs and route.images is None:
        raise APIError(400, f"this model does not accept images (model {route.name!r} is text-only); "
                       f"{refs[0].where} is an image", param=refs[0].where)
    if len(refs) > route.limit_images_per_prompt:
        raise APIError(400, f"the messages hold {len(refs)} images, over the limit of --limit-images-per-prompt="
                       f"{route.limit_images_per_prompt}", param="messages")
    return out, refs


def render_chat(route: Route, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                template_kwargs: dict | None, tools: list[dict] | None = None) -> list[int]:
    """The chat template's prompt token ids; 400 for what the template or its arguments refuse.
    tools: checked OpenAI function tools (serve/tool_calls.py) for the template."""
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message=true needs add_generation_prompt=false: the last message "
                       "is either continued or followed by a new assistant turn", param="continue_final_message")
    kwargs = dict(template_kwargs or {})
    if clash := sorted(_TEMPLATE_ARGS & kwargs.keys()):
        raise APIError(400, f"chat_template_kwargs.{clash[0]} is invalid: it is an argument of the chat template "
                       "call, not a template variable", param=f"chat_template_kwargs.{clash[0]}")
    try:
        if tools:
            kwargs["tools"] = tools
        return route.tokenizer.apply_chat_template(messages, add_generation_prompt,
                                                continue_final_message=continue_final_message, **kwargs)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # the template itself rejected the conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
