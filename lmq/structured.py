"""Structured output: GuidedDecodingParams (vLLM's shape) and the grammar machinery behind it.

llguidance does the work (chosen against xgrammar in bench/structured_libs.py and on random
models: xgrammar fills masks faster but lets JSON strings hold raw control characters and
invalid UTF-8, see BENCHMARKS.md). Each distinct grammar is checked and translated once
(`Grammars`, cached by `GuidedDecodingParams.key`; llguidance builds its lexer lazily, so a
grammar costs about a millisecond); each sequence owns a matcher, advanced with every token it
samples. A step of the engine:

    host:   launch forward | fill bitmask rows of the constrained sequences | apply, sample
    device: forward ............................................ | masked_fill, sample

The bitmask ([rows, ceil(V / 32)] int32, bit t of a row set = token t allowed) is filled on the
host after the forward pass is queued, so on a GPU it costs no device time.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from lmq.transfer import to_device

if TYPE_CHECKING:
    import llguidance

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_CACHE_SIZE = 256  # compiled grammars kept per engine
_MAX_WHITESPACE = 2  # consecutive whitespace characters a JSON grammar allows (small models loop on it)


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Exactly one of: `json` (a JSON schema, as a dict or JSON text), `regex`, `choice` (the
    output is one of these strings), `grammar` (Lark, or GBNF / vLLM's EBNF: `root ::= ...`), `json_object`
    (any JSON object). `disable_any_whitespace`: JSON without whitespace between tokens.
    `field`: the request field it came from, named in errors (the server sets it, e.g.
    "response_format.json_schema"); by default "guided_decoding.<kind>"."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    field: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # stored as text: hashable, and one cache key per schema
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"guided_decoding={self!r} is invalid: must set exactly one of {', '.join(_KINDS)} "
                             f"(got {len(set_)}: {set_})")
        name = self.field or f"guided_decoding.{self.kind}"
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"{name}: the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{name}: a JSON schema must be an object, got {type(schema).__name__}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"{name}={self.regex!r} is invalid: must be a string")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar.strip()):
            raise ValueError(f"{name}={self.grammar!r} is invalid: must be a non-empty string")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"{name}={list(self.choice)!r} is invalid: must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def name(self) -> str:
        return self.field or f"guided_decoding.{self.kind}"

    @property
    def key(self) -> tuple:
        """Equal for two params that compile to the same grammar (`field` aside)."""
        return self.kind, getattr(self, self.kind), self.disable_any_whitespace


def as_guided(value: GuidedDecodingParams | dict | None) -> GuidedDecodingParams | None:
    """SamplingParams(guided_decoding=...) takes the params or a dict of their fields."""
    if value is None or isinstance(value, GuidedDecodingParams):
        return value
    if isinstance(value, dict):
        return GuidedDecodingParams(**value)
    raise ValueError(f"guided_decoding={value!r} is invalid: must be GuidedDecodingParams, a dict of its "
                     f"fields, or None")


def _grammar(guided: GuidedDecodingParams) -> str:
    """llguidance's grammar text for the params (it is checked by `check_guided`)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if guided.json is not None:
        return LLMatcher.grammar_from_json_schema(guided.json, defaults=_json_options(guided))
    if guided.regex is not None:
        return LLMatcher.grammar_from_regex(guided.regex)
    if guided.choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in guided.choice))
    if guided.grammar is not None:  # GBNF (vLLM's EBNF dialect, `root ::= ...`) or Lark
        return LLMatcher.grammar_from_lark(any_to_lark(guided.grammar))
    return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_json_options(guided))


def _json_options(guided: GuidedDecodingParams) -> dict:
    if guided.disable_any_whitespace:
        return {"whitespace_flexible": False}
    return {"whitespace_pattern": f"[\\x20\\x09\\x0A\\x0D]{{0,{_MAX_WHITESPACE}}}"}


@lru_cache(maxsize=_CACHE_SIZE)
def check_guided(guided: GuidedDecodingParams) -> None:
    """Raise ValueError naming the field and llguidance's reason if the grammar cannot compile.
    Needs no tokenizer, so the server process checks requests before the engine sees them."""
    from llguidance import LLMatcher

    try:
        error = LLMatcher.validate_grammar(_grammar(guided))
    except Exception as e:  # a JSON schema llguidance cannot read at all
        error = str(e)
    if error:
        raise ValueError(f"{guided.name}: the grammar library (llguidance) cannot compile it: {error.strip()}")


class Grammars:
    """One engine's grammars: llguidance's tokenizer, grammar texts by key (LRU), matchers,
    bitmasks. `vocab_size`: the model's logits width (may exceed the tokenizer's; the extra ids
    are never allowed); `stop_token_ids`: what ends a constrained sequence once its grammar
    accepts (llguidance also ends it, with no stop token, when nothing else may follow)."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int], device: torch.device) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)
        self.executor = llguidance.LLExecutor()  # fills a batch's masks on its own threads, off the GIL
        self.texts: OrderedDict[tuple, str] = OrderedDict()
        self.vocab_size, self.device = vocab_size, device
        self.words = (vocab_size + 31) // 32
        self._bitmask = torch.empty(0, self.words, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32, device=device)

    def matcher(self, guided: GuidedDecodingParams) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence. ValueError naming the field if it cannot compile."""
        text = self.texts.get(guided.key)
        if text is None:
            check_guided(guided)
            text = self.texts[guided.key] = _grammar(guided)
            if len(self.texts) > _CACHE_SIZE:
                self.texts.popitem(last=False)
        else:
            self.texts.move_to_end(guided.key)
        m = self.llg.LLMatcher(self.tokenizer, text)
        if m.is_error():
            raise ValueError(f"{guided.name}: the grammar library (llguidance) cannot compile it for this "
                             f"tokenizer: {m.get_error()}")
        return m

    def fill(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), words] int32 bitmask of each matcher's next allowed tokens, on the
        device (copied from pinned host memory without waiting, when the device is a GPU)."""
        n = len(matchers)
        if self._bitmask.shape[0] < n:
            pin = self.device.type == "cuda"
            self._bitmask = torch.empty(max(n, 2 * self._bitmask.shape[0]), self.words, dtype=torch.int32,
                                        pin_memory=pin)
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], self._bitmask)
        host = self._bitmask[:n]
        if self.device.type == "cpu":
            return host.clone()  # the buffer is refilled next step
        # A pinned buffer reused next step while this copy may still be queued: copy from a
        # fresh pinned clone so the next fill never races the transfer.
        return host.clone().pin_memory().to(self.device, non_blocking=True) if n else host.to(self.device)

    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
        """logits [B, V] with every token outside each listed row's bitmask at -inf (a new
        tensor; the runner's output is left as it was). bitmask: [len(rows), words]."""
        vocab = logits.shape[1]
        allowed = ((bitmask[:, :, None] >> self._bits) & 1).bool().flatten(1)[:, :vocab]  # [R, V]
        index = to_device(rows, logits.device)
        masked = logits[index].masked_fill(~allowed, float("-inf"))
        return logits.index_put((index,), masked)
