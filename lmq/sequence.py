"""One request's state (a `Request` of n `Sequence`s) and the user-facing output types."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmq.sampling import Logprob, SamplingParams

if TYPE_CHECKING:
    from lmq.lora_request import LoRARequest
    from lmq.multimodal import ImageInput
    from lora.manager import Adapter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field-by-field: sequences are looked up in lists every step
class Sequence:
    """One sample of a request: its tokens and how far the KV cache has computed them.

    `num_computed_tokens` counts tokens whose K/V are in this sequence's blocks; the
    tokens `token_ids[num_computed_tokens:]` are what the next steps compute (a prompt
    chunk, a recompute after preemption, or the one token a decode step feeds back).
    """

    seq_id: int
    request: Request
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    # Tokens a step still in flight samples for this sequence, not yet in `token_ids` (async
    # scheduling: step n+1 computes the K/V of step n's token before the host has read it).
    num_pending: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    text: str = ""
    # Incremental detokenizer state (see Detokenizer).
    prefix_offset: int = 0
    read_offset: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    # A guided request's xgrammar GrammarMatcher, advanced with every output token (so it always
    # matches `output_token_ids`, also across preemption); None once the sequence finishes.
    matcher: object | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def adapter(self) -> Adapter | None:
        return self.request.adapter

    @property
    def cache_key(self) -> int | None:
        """Extra prefix-cache key: KV computed under one adapter is never reused by another."""
        return None if self.request.adapter is None else self.request.adapter.uid

    @property
    def key_token_ids(self) -> list[int]:
        """Token ids as the prefix cache keys them: image positions carry their image's hash."""
        key = self.request.key_prompt_ids
        return self.token_ids if key is None else key + self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


@dataclass(eq=False)
class Request:
    """A prompt and its n samples. Sample 0 computes the prompt; the others fork from it
    once the prompt is in the cache, sharing its full KV blocks."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    first_token_time: float | None = None
    aborted: bool = False  # also before an n > 1 request has forked its samples
    adapter: Adapter | None = None  # None: the base model
    images: list[ImageInput] = field(default_factory=list)  # in prompt order
    image_features: list[torch.Tensor] | None = None  # [num_tokens, hidden] per image, once encoded
    key_prompt_ids: list[int] | None = None  # prompt ids with image positions hashed (multimodal.cache_key_ids)

    @property
    def is_finished(self) -> bool:
        if self.aborted:
            return True
        if len(self.seqs) < self.params.n:
            return False
        for s in self.seqs:  # (a loop, not all(...): this runs for every request every step)
            if s.status is not SequenceStatus.FINISHED:
                return False
        return True

    @property
    def needs_fork(self) -> bool:
        return self.params.n > 1 and len(self.seqs) == 1


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        """vLLM's: whether this sample has ended."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0  # time.monotonic() when the request was added
    first_token_time: float | None = None
    lora_request: LoRARequest | None = None  # set by LLM.generate for a request made with one (as vLLM)

    @staticmethod
    def from_request(req: Request) -> RequestOutput:
        """A snapshot (copies, not views: the engine keeps appending to the sequences). While a
        sequence runs, text that may still turn out to begin a stop string is held back."""
        stop = req.params.stop
        hold = max(map(len, stop)) - 1 if stop else 0
        outs = []
        for s in req.seqs:
            ids = s.output_token_ids
            lps = list(s.logprobs) if req.params.logprobs is not None else None
            cum = sum(lp[t].logprob for lp, t in zip(lps, ids)) if lps is not None else None
            text = s.text if s.is_finished or not hold else s.text[:max(len(s.text) - hold, 0)]
            text = text if req.params.detokenize else ""
            outs.append(CompletionOutput(s.sample_index, text, ids, s.finish_reason, s.stop_reason, lps, cum))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.is_finished,
                             req.prompt_logprobs if req.params.prompt_logprobs is not None else None,
                             req.seqs[0].num_cached_tokens if req.seqs else 0, req.arrival_time,
                             req.first_token_time)
