"""Per-step output deltas between the engine process and the server process.

The engine core (child process) turns each cumulative RequestOutput snapshot into what changed
since the last one it sent for that request; the front end (server process) rebuilds the same
cumulative snapshot from the deltas. Only the new tokens, text and logprobs cross the pipe, so
a step's message grows with the batch, not with the length of the outputs.

    child:  RequestOutput ─► DeltaEncoder.encode ─► RequestDelta ─► pipe (pickle)
    parent: RequestDelta ─► OutputAssembler.apply ─► RequestOutput (equal to the child's)

Text is sent as (offset, piece): the rebuilt text is `text[:offset] + piece`. While a sequence
runs its visible text only grows, so offset is the length already sent; but the finished text
need not extend what was shown (a stop string cut it, or the whole text was re-decoded at the
end), and then the offset says where they part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmq.sampling import Logprob, SamplingParams
from lmq.sequence import CompletionOutput, RequestOutput

# The wire format is plain tuples, in these layouts: a NamedTuple or dataclass pickles 5-10x
# slower (a Python-level reduce per object), and a step's message holds one per running request.
SeqDelta = tuple[
    int,  # sample index
    list[int],  # new output token ids
    int,  # text offset
    str,  # the text from that offset on
    list[dict[int, Logprob]] | None,  # one entry per new token, when the request asked for logprobs
    float | None,  # cumulative logprob: sent, not summed here, as float sums must match bit for bit
    str | None,  # finish_reason
    int | str | None,  # stop_reason
]
RequestDelta = tuple[
    str,  # request_id
    list[SeqDelta],  # the samples that changed
    bool,  # finished
    float | None,  # first_token_time
    int,  # num_cached_tokens
    list[dict[int, Logprob] | None] | None,  # prompt logprobs not sent before
    BaseException | None,  # the request failed: raised in its stream
]


def failed_delta(request_id: str, error: BaseException) -> RequestDelta:
    return (request_id, [], True, None, 0, None, error)


@dataclass(slots=True)
class _SentSeq:
    """What the parent has of one sample."""

    tokens: int = 0
    text: str = ""  # a reference to the engine's immutable string, not a copy
    logprobs: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class _Sent:
    seqs: dict[int, _SentSeq] = field(default_factory=dict)
    prompt_logprobs: int = 0


class DeltaEncoder:
    """Child side: remembers, per request, what the parent already has."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, out: RequestOutput) -> RequestDelta:
        rid = out.request_id
        sent = self._sent.pop(rid, None) if out.finished else self._sent.get(rid)
        if sent is None:
            sent = _Sent()
            if not out.finished:
                self._sent[rid] = sent
        seqs = []
        for c in out.outputs:
            s = sent.seqs.get(c.index)
            if s is None:
                s = sent.seqs[c.index] = _SentSeq()
            text = c.text
            offset = len(s.text) if text.startswith(s.text) else _common_prefix(text, s.text)
            if len(c.token_ids) > s.tokens or offset != len(text) or c.finish_reason != s.finish_reason:
                lps = c.logprobs
                seqs.append((c.index, c.token_ids[s.tokens:], offset, text[offset:],
                             lps[s.logprobs:] if lps is not None else None, c.cumulative_logprob, c.finish_reason,
                             c.stop_reason))
                s.tokens, s.text, s.finish_reason = len(c.token_ids), text, c.finish_reason
                s.logprobs = len(lps) if lps is not None else 0
        plps = None
        if out.prompt_logprobs is not None and len(out.prompt_logprobs) > sent.prompt_logprobs:
            plps = out.prompt_logprobs[sent.prompt_logprobs:]
            sent.prompt_logprobs += len(plps)
        return rid, seqs, out.finished, out.first_token_time, out.num_cached_tokens, plps, None

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@dataclass(slots=True)
class _Seq:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OutputAssembler:
    """Parent side: one request's deltas -> cumulative RequestOutput snapshots, equal field for
    field to the ones the engine built, but for arrival_time: the time this side took the
    request (first_token_time comes from the engine process; time.monotonic() is one clock for
    every process on Linux)."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.params, self.arrival_time = params, arrival_time
        self.seqs: list[_Seq] = []  # by sample index, which is also the engine's order
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = [] if params.prompt_logprobs is not None \
            else None
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0

    def apply(self, delta: RequestDelta) -> RequestOutput:
        self.update(delta)
        return self.snapshot(delta[2])

    def update(self, delta: RequestDelta) -> None:
        _, seqs, _, self.first_token_time, self.num_cached_tokens, prompt_logprobs, _ = delta
        for index, token_ids, offset, text, logprobs, cumulative, finish_reason, stop_reason in seqs:
            while len(self.seqs) <= index:
                self.seqs.append(_Seq(len(self.seqs), logprobs=[] if self.params.logprobs is not None else None))
            s = self.seqs[index]
            s.token_ids += token_ids
            s.text = s.text + text if offset == len(s.text) else s.text[:offset] + text
            if logprobs is not None and s.logprobs is not None:
                s.logprobs += logprobs
            s.cumulative_logprob, s.finish_reason, s.stop_reason = cumulative, finish_reason, stop_reason
        if prompt_logprobs:
            # A new list, so snapshots already handed out never change under their reader.
            self.prompt_logprobs = (self.prompt_logprobs or []) + prompt_logprobs

    def snapshot(self, finished: bool) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason, s.stop_reason,
                                 list(s.logprobs) if s.logprobs is not None else None, s.cumulative_logprob)
                for s in self.seqs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, finished,
                             self.prompt_logprobs, self.num_cached_tokens, self.arrival_time, self.first_token_time)
