"""HF tokenizer, chat templates, incremental detokenization and stop strings."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer

from lmq.sequence import Sequence

if TYPE_CHECKING:
    from lmq.config import EngineConfig

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces/merges come out right


class Tokenizer:
    def __init__(self, path: str, chat_template: str | None = None, trust_remote_code: bool = False) -> None:
        """path: a folder with tokenizer.json. chat_template: Jinja text replacing the folder's own."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer={path!r} is not a folder (expected one with tokenizer.json; "
                                    "tokenizers are never downloaded)")
        self.hf = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not self.hf.is_fast:
            raise ValueError(f"the tokenizer in {path} is not a fast (Rust) tokenizer; lmq needs tokenizer.json")
        if chat_template is not None:
            self.hf.chat_template = chat_template
        self._token_texts: dict[int, str] = {}

    @staticmethod
    def for_config(config: EngineConfig) -> Tokenizer:
        """The tokenizer an engine's config names (`tokenizer`, else the model folder)."""
        return Tokenizer(config.tokenizer_path, config.chat_template, config.trust_remote_code)

    def __len__(self) -> int:
        return len(self.hf)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text, as vLLM's `Logprob.decoded_token` has it (the token converted
        to a string alone, special tokens included; a piece of a UTF-8 character reads U+FFFD;
        an id past the tokenizer's vocabulary, which a model's padded embedding may have, "")."""
        cache = self._token_texts
        out = []
        for t in token_ids:
            text = cache.get(t)
            if text is None:
                token = self.hf.convert_ids_to_tokens(t)
                text = cache[t] = "" if token is None else self.hf.convert_tokens_to_string([token])
            out.append(text)
        return out

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            **template_kwargs: object) -> list[int]:
        """messages: [{"role": ..., "content": ...}] -> prompt token ids. chat_template: Jinja
        text for this call (default: the tokenizer's, or the one it was built with).
        continue_final_message: the last (assistant) message stays open for the model to go on
        with; template_kwargs are extra variables the template reads (e.g. enable_thinking, tools)."""
        if not (chat_template or self.hf.chat_template):
            raise ValueError("this model has no chat template: give one (--chat-template / chat_template=) or use "
                             "generate() with a plain prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template, continue_final_message=continue_final_message,
                                           **template_kwargs)
        return self.hf.encode(text, add_special_tokens=False)

    @property
    def chat_template(self) -> str:
        template = self.hf.chat_template or ""
        if isinstance(template, dict):  # named templates: transformers renders "tool_use" for tools
            template = template.get("tool_use") or template.get("default") or ""
        return template

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the chat template reads the `tools` it is given."""
        import jinja2.meta

        if not self.chat_template:
            return False
        try:
            ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(self.chat_template)
        except jinja2.TemplateSyntaxError:  # a tag of transformers' own ({% generation %}): read the text
            return "tools" in self.chat_template
        return "tools" in jinja2.meta.find_undeclared_variables(ast)


def load_chat_template(value: str) -> str:
    """vLLM's --chat-template: a file's path (read) or the Jinja template itself (inline)."""
    p = Path(value).expanduser()
    if p.is_file():
        return p.read_text()
    if any(c in value for c in "{}\n"):
        return value
    raise ValueError(f"chat_template={value!r} is neither a file that exists nor a Jinja template "
                     "(inline templates contain '{{' or '{%')")


class Detokenizer:
    """Turns each new token of a sequence into new text, and applies stop strings.

    Incremental decoding re-decodes a short window, `token_ids[prefix_offset:]` against
    `token_ids[prefix_offset:read_offset]`, and holds text back while it ends in an incomplete
    character (U+FFFD). It decodes with the Rust tokenizer directly (no Python post-processing),
    as `full_text` does, so the streamed text is always a prefix of the final text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.backend = tokenizer.hf.backend_tokenizer

    def start(self, seq: Sequence) -> None:
        # A few prompt tokens of context, so the first output token's leading space is right.
        seq.prefix_offset = _context_start(seq)
        seq.read_offset = seq.num_prompt_tokens

    def step(self, seq: Sequence) -> str:
        """Decode the sequence's newest token; returns the text it adds ("" while a character is
        incomplete). Finishes the sequence on a stop string."""
        skip, toks = seq.params.skip_special_tokens, seq.token_ids
        prefix = self.backend.decode(toks[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = self.backend.decode(toks[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(toks)
        before = len(seq.text)
        seq.text += delta
        self._apply_stop_strings(seq, len(delta))
        return seq.text[before:]

    @staticmethod
    def _apply_stop_strings(seq: Sequence, new_chars: int) -> None:
        if seq.num_output_tokens <= seq.params.min_tokens:  # vLLM: none in the first min_tokens tokens
            return
        for stop in seq.params.stop:
            # Only look where the new text could complete a stop string.
            start = max(len(seq.text) - new_chars - len(stop) + 1, 0)
            idx = seq.text.find(stop, start)
            if idx != -1:
                end = idx + len(stop) if seq.params.include_stop_str_in_output else idx
                seq.text = seq.text[:end]
                seq.finish("stop", stop)
                return

    def full_text(self, seq: Sequence, end: int | None = None) -> str:
        """The output text of token_ids[:end] at once, equal to what `step` builds token by token."""
        skip = seq.params.skip_special_tokens
        start = _context_start(seq)
        prefix = self.backend.decode(seq.token_ids[start:seq.num_prompt_tokens], skip_special_tokens=skip)
        return self.backend.decode(seq.token_ids[start:end], skip_special_tokens=skip)[len(prefix):]


def _context_start(seq: Sequence) -> int:
    """First prompt token decoded together with the output."""
    return max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)
