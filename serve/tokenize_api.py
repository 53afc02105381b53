"""POST /tokenize and /detokenize, in vLLM's shapes: the token ids a prompt or a conversation
becomes (with the served model's tokenizer and chat template), and the text of token ids."""

from __future__ import annotations

from serve.chat_prompt import chat_messages, render_chat
from serve.errors import APIError
from serve.protocol import DetokenizeRequest, TokenizeRequest
from serve.router import Route


def tokenize(req: TokenizeRequest, route: Route) -> dict:
    """{count, max_model_len, tokens, token_strs}: token_strs only with return_token_strs."""
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send exactly one of prompt (a text) or messages (a conversation)",
                       param="prompt" if req.prompt is None else "messages")
    if req.prompt is not None:
        ids = route.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        if req.add_special_tokens:
            raise APIError(400, "add_special_tokens=true is not supported with messages: the chat template "
                           "writes the special tokens", param="add_special_tokens")
        messages, refs = chat_messages(req.messages, route)
        if refs:
            raise APIError(400, f"/tokenize does not take images; {refs[0].where} is an image", param=refs[0].where)
        ids = render_chat(route, messages, req.add_generation_prompt, req.continue_final_message,
                          req.chat_template_kwargs)
    strs = route.tokenizer.hf.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": route.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(req: DetokenizeRequest, route: Route) -> dict:
    """{prompt}: the text of the token ids, special tokens included (as vLLM decodes them)."""
    vocab = route.engine.config.model.vocab_size
    bad = [(i, t) for i, t in enumerate(req.tokens) if not 0 <= t < vocab]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        shown = ", ".join(f"tokens[{i}]={t}" for i, t in bad[:5]) + more
        raise APIError(400, f"{shown}: out of range [0, {vocab}) (the model's vocab_size)",
                       param=f"tokens[{bad[0][0]}]")
    return {"prompt": route.tokenizer.decode(req.tokens, skip_special_tokens=False)}
