"""HF tokenizer, chat templates, incremental detokenization and stop strings."""

from __future__ import annotations

from transformers import AutoTokenizer

from lmq.sequence import Sequence

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so leading spaces/merges come out right


class Tokenizer:
    def __init__(self, path: str) -> None:
        self.hf = AutoTokenizer.from_pretrained(path)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """messages: [{"role": ..., "content": ...}] -> prompt token ids."""
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.hf.encode(text, add_special_tokens=False)


class Detokenizer:
    """Turns each new token of a sequence into new text, and applies stop strings."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        seq.prefix_offset = max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)
        seq.read_offset = seq.num_prompt_tokens

    def step(self, seq: Sequence) -> str:
        """Decode the sequence's newest token; returns the text it adds (may be "" while a
        multi-byte character is incomplete). Finishes the sequence on a stop string."""
        skip = seq.params.skip_special_tokens
        toks = seq.token_ids
        prefix = self.tokenizer.decode(toks[seq.prefix_offset:seq.read_offset], skip)
        full = self.tokenizer.decode(toks[seq.prefix_offset:], skip)
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
        start = max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)
        prefix = self.tokenizer.decode(seq.token_ids[start:seq.num_prompt_tokens], skip)
        return self.tokenizer.decode(seq.token_ids[start:end], skip)[len(prefix):]
