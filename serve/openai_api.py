"""/v1/chat/completions and /v1/completions: request -> prompts + SamplingParams, engine
outputs -> OpenAI responses, as one JSON body or as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmq.async_engine import EngineDeadError, QueueFullError, RequestStream
from lmq.chat_content import ImageRef
from lmq.multimodal import ProcessedImage
from lmq.sampling import MAX_LOGPROBS, Logprob, SamplingParams
from lmq.sequence import CompletionOutput, RequestOutput
from serve import tool_calls
from serve.chat_prompt import chat_messages, render_chat
from serve.errors import APIError, bad_value, error_body
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest, CompletionRequest, refuse_unsupported
from serve.router import Route
from serve.structured_output import guided_decoding
from serve.tool_calls import ChoiceStreams, ToolRequest
from vision.media import MediaError

log = logging.getLogger("lmq")

# Optional request fields that map one to one onto SamplingParams; unset ones keep its defaults.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "logit_bias", "allowed_token_ids", "prompt_logprobs")


@dataclass
class Job:
    """One API call: its prompts (several for a batched /v1/completions), shared params."""

    kind: str  # "chat" | "text"
    id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    include_usage: bool
    tokens_as_ids: bool = False
    echo: list[str] | None = None  # completions with echo=true: each prompt's text, put before its output
    prompt_logprobs: bool = False  # the request asked for them (echo may compute them without showing them)
    image_refs: list[ImageRef] = field(default_factory=list)  # chat: the images of the messages
    images: list[ProcessedImage] | None = None  # once loaded (load_images)
    tools: ToolRequest | None = None  # chat with tools: serve/tool_calls.py
    tool_parser: tool_calls.ToolParser | None = None  # None: the output is plain content
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                    logprobs: int | None, **overrides: object) -> SamplingParams:
    """The request's SamplingParams; first refuses what lmq cannot serve (NOT_SUPPORTED)."""
    refuse_unsupported(req)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of} is not supported: only best_of equal to n={req.n} "
                       "(every candidate is returned)", param="best_of")
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs is not supported with stream=true", param="prompt_logprobs")
    if req.user is not None:
        log.debug("lmq: request for end user %r", req.user)
    values = {k: getattr(req, k) for k in _SAMPLING_FIELDS if getattr(req, k) is not None}
    values["guided_decoding"] = guided_decoding(req)  # a 400 naming the field if it cannot compile
    values.update(overrides)
    try:  # SamplingParams normalizes stop / stop_token_ids (a string, a list or None)
        return SamplingParams(n=req.n, max_tokens=max_tokens, stop=req.stop or (),
                              stop_token_ids=req.stop_token_ids or (), seed=req.seed, ignore_eos=req.ignore_eos,
                              logprobs=logprobs, min_tokens=req.min_tokens, bad_words=tuple(req.bad_words or ()),
                              include_stop_str_in_output=req.include_stop_str_in_output,
                              skip_special_tokens=req.skip_special_tokens, **values)
    except ValueError as e:
        raise bad_value(e) from None


def chat_job(req: ChatCompletionRequest, route: Route) -> Job:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs={req.top_logprobs} is invalid: must be an integer in [0, {MAX_LOGPROBS}]",
                       param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens, logprobs)
    messages, refs = chat_messages(req.messages, route)
    tools, tool_parser, messages = _chat_tools(req, route, messages)
    params = tool_calls.enforce(params, tools, tool_parser)
    prompt = render_chat(route, messages, req.add_generation_prompt, req.continue_final_message,
                         req.chat_template_kwargs, tools.tools if tools else None)
    include = bool(req.stream_options and req.stream_options.include_usage)
    return Job("chat", f"chatcmpl-{uuid.uuid4().hex}", route.name, [prompt], params, include,
               req.return_tokens_as_token_ids, image_refs=refs, prompt_logprobs=req.prompt_logprobs is not None,
               tools=tools, tool_parser=tool_parser)


def _chat_tools(req: ChatCompletionRequest, route: Route, messages: list[dict]
                ) -> tuple[ToolRequest | None, tool_calls.ToolParser | None, list[dict]]:
    """The request's tools, the parser of its output, and messages with tool calls as templates read them."""
    tools = tool_calls.tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    return (tools, tool_calls.prepare(tools, route.tokenizer, route.tool_call_parser),
            tool_calls.template_messages(messages))


async def load_images(job: Job, route: Route) -> None:
    """Fetch, decode and preprocess the job's images on a worker thread (network and CPU work
    stay off the event loop); a bad one is a 400 naming its message part."""
    if not job.image_refs:
        return

    def work() -> list[ProcessedImage]:
        return route.images.process(route.images.load(job.image_refs))

    try:
        job.images = await asyncio.to_thread(work)
    except MediaError as e:
        where = str(e).split(":", 1)[0]
        raise APIError(400, str(e), param=where if where.startswith("messages[") else "messages") from None


def completion_job(req: CompletionRequest, route: Route) -> Job:
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise APIError(400, "prompt is empty: at least 1 prompt is required", param="prompt")
    ids = [route.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompts]
    vocab = route.engine.config.model.vocab_size
    for x in ids:  # here, before `echo` decodes them (the tokenizer overflows on huge ids)
        if bad := [t for t in x if not 0 <= t < vocab]:
            raise APIError(400, f"prompt token id {bad[0]} is out of range [0, {vocab})", param="prompt")
    # echo with logprobs: the prompt's tokens come with theirs, so the engine computes them.
    echo_lps = {"prompt_logprobs": max(req.logprobs, req.prompt_logprobs or 0)} \
        if req.echo and req.logprobs is not None else {}
    params = sampling_params(req, req.max_tokens, req.logprobs, **echo_lps)
    include = bool(req.stream_options and req.stream_options.include_usage)
    echo = [x if isinstance(x, str) else route.tokenizer.decode(list(x), params.skip_special_tokens)
            for x in prompts] if req.echo else None
    return Job("text", f"cmpl-{uuid.uuid4().hex}", route.name, ids, params, include, req.return_tokens_as_token_ids,
               echo=echo, prompt_logprobs=req.prompt_logprobs is not None)


def start(job: Job, route: Route, stream: bool) -> list[RequestStream]:
    """Queue every prompt of the job; on any refusal, abort the ones already queued."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(job.prompts):
            streams.append(route.engine.add_request(f"{job.id}-{i}", prompt, job.params, stream,
                                                    images=job.images, adapter=route.adapter))
    except BaseException as e:
        for s in streams:
            s.abort()
        if isinstance(e, QueueFullError):
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e)) from None
        if isinstance(e, ValueError):
            code = "context_length_exceeded" if "context length" in str(e) else None
            err = bad_value(e)
            raise APIError(400, err.message, err.param or ("messages" if job.kind == "chat" else "prompt"),
                           code) from None
        raise
    return streams


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several request streams as they come, tagged with the prompt index."""
    if len(streams) == 1:  # the common case: no pump task, no extra queue
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- formatting --------------------------------------------------------------------------------
def _tok(route: Route, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else route.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(route: Route, token_ids: list[int], lps: list[dict[int, Logprob]], k: int, as_id: bool) -> dict:
    def item(token_id: int, lp: Logprob) -> dict:
        s = _tok(route, token_id, as_id)
        return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode())}

    return {"content": [{**item(t, e[t]), "top_logprobs": [item(i, lp) for i, lp in _top(e, k)]}
                        for t, e in zip(token_ids, lps)]}


def _text_logprobs(route: Route, token_ids: list[int], lps: list[dict[int, Logprob] | None], k: int, offset: int,
                   as_id: bool) -> dict:
    """None entries: an echoed prompt's first token, which nothing predicts."""
    tokens = [_tok(route, t, as_id) for t in token_ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [None if e is None else e[t].logprob for t, e in zip(token_ids, lps)],
            "top_logprobs": [None if e is None else {_tok(route, i, as_id): lp.logprob for i, lp in _top(e, k)}
                             for e in lps],
            "text_offset": offsets}


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of a step (the sampled one is in `entry` even when it is not)."""
    return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]


def _logprobs(job: Job, route: Route, token_ids: list[int], lps: list | None, offset: int = 0) -> dict | None:
    if job.params.logprobs is None or lps is None:
        return None
    if job.kind == "chat":
        return _chat_logprobs(route, token_ids, lps, job.params.logprobs, job.tokens_as_ids)
    return _text_logprobs(route, token_ids, lps, job.params.logprobs, offset, job.tokens_as_ids)


def _view(job: Job, out: RequestOutput, c: CompletionOutput, p: int) -> tuple[str, list[int], list | None]:
    """A choice's text, token ids and logprobs as the response shows them: with echo, the prompt's
    first (its tokens as far as their logprobs have come: all of them once any output exists)."""
    if job.echo is None:
        return c.text, c.token_ids, c.logprobs
    if c.logprobs is None:
        return job.echo[p] + c.text, c.token_ids, None
    prompt_lps = list(out.prompt_logprobs or [])
    return (job.echo[p] + c.text, out.prompt_token_ids[:len(prompt_lps)] + c.token_ids,
            prompt_lps + list(c.logprobs))


def _prompt_logprobs(route: Route, out: RequestOutput) -> list[dict | None]:
    """vLLM's shape: per prompt token, None (the first) or {token id: {logprob, rank, decoded_token}}."""
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                             "decoded_token": _tok(route, t)} for t, lp in e.items()}
            for e in out.prompt_logprobs or []]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _observe(metrics: Metrics, job: Job, outs: dict[int, RequestOutput]) -> tuple[int, int]:
    """Records each of the job's engine requests in the metrics; returns the job's usage."""
    end = time.monotonic()
    for o in outs.values():
        metrics.observe_request(o, job.arrival, end)
    prompt = sum(len(o.prompt_token_ids) for o in outs.values())
    completion = sum(len(c.token_ids) for o in outs.values() for c in o.outputs)
    return prompt, completion


# -- responses ---------------------------------------------------------------------------------
async def respond(job: Job, route: Route, request: Request, metrics: Metrics,
                  stream: bool) -> JSONResponse | StreamingResponse:
    streams = start(job, route, stream)
    if stream:
        return StreamingResponse(_sse(job, route, streams, metrics), media_type="text/event-stream")
    return await _whole(job, route, streams, request, metrics)


async def _whole(job: Job, route: Route, streams: list[RequestStream], request: Request,
                 metrics: Metrics) -> JSONResponse:
    last: dict[int, RequestOutput] = {}

    async def collect() -> None:
        async for i, out in _merged(streams):
            last[i] = out

    task = asyncio.create_task(collect())
    while not task.done():  # a client that hangs up aborts its requests
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return JSONResponse(error_body(499, "client disconnected"), 499)
    task.result()
    n = job.params.n
    choices = []
    for i in sorted(last):
        for c in last[i].outputs:
            text, token_ids, lps = _view(job, last[i], c, i)
            item = {"index": i * n + c.index, "finish_reason": c.finish_reason,
                    "logprobs": _logprobs(job, route, token_ids, lps)}
            if job.kind == "chat":
                item["message"], item["finish_reason"] = tool_calls.message(
                    text, job.tool_parser, job.tools is None or job.tools.parallel, c.finish_reason)
            else:
                item["text"] = text
                if job.prompt_logprobs:
                    item["prompt_logprobs"] = _prompt_logprobs(route, last[i])
            choices.append(item)
    prompt, completion = _observe(metrics, job, last)
    obj = "chat.completion" if job.kind == "chat" else "text_completion"
    body = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices,
            "usage": _usage(prompt, completion)}
    if job.prompt_logprobs and job.kind == "chat":  # vLLM: the chat response's, not a choice's
        body["prompt_logprobs"] = _prompt_logprobs(route, last[0])
    return JSONResponse(body)


def _choice(job: Job, idx: int, text: str, logprobs: dict | None, finish_reason: str | None,
            tool_delta: dict | None = None) -> dict:
    """tool_delta: with a tool parser, the chat delta it made of the text (held back, content, tool_calls)."""
    item = {"index": idx, "logprobs": logprobs, "finish_reason": finish_reason}
    if job.kind == "chat":
        item["delta"] = tool_delta if tool_delta is not None else {"content": text} if text else {}
    else:
        item["text"] = text
    return item


def _sse_chunk(job: Job, choices: list[dict], usage: dict | None = None) -> str:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    body = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _sse(job: Job, route: Route, streams: list[RequestStream], metrics: Metrics) -> AsyncIterator[str]:
    """role chunk, content deltas, a finish_reason chunk per choice, the usage chunk, [DONE].
    However the response ends (a client gone before the first chunk too), its requests stop."""
    try:
        async for chunk in _sse_chunks(job, route, streams, metrics):
            yield chunk
    finally:
        for s in streams:
            s.abort()  # a no-op for finished requests


async def _sse_chunks(job: Job, route: Route, streams: list[RequestStream], metrics: Metrics) -> AsyncIterator[str]:
    n = job.params.n
    sent_text: dict[int, int] = {}
    sent_toks: dict[int, int] = {}
    if job.kind == "chat":
        yield _sse_chunk(job, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(n * len(streams))])
    last: dict[int, RequestOutput] = {}
    done: set[int] = set()
    tool_streams = ChoiceStreams(job.tool_parser, job.tools.parallel) if job.tool_parser else None
    async for p, out in _merged(streams):
        last[p] = out
        deltas, finishes = [], []
        for c in out.outputs:
            idx = p * n + c.index
            if idx in done:
                continue
            text, token_ids, all_lps = _view(job, out, c, p)
            t0, k0 = sent_text.get(idx, 0), sent_toks.get(idx, 0)
            new_text, new_toks = text[t0:], token_ids[k0:]
            sent_text[idx], sent_toks[idx] = len(text), len(token_ids)
            tool_delta = tool_streams.delta(idx, text, c.finish_reason is not None) if tool_streams else None
            if (new_text and tool_streams is None) or tool_delta or (new_toks and job.params.logprobs is not None):
                lps = _logprobs(job, route, new_toks, all_lps[k0:len(token_ids)] if all_lps else None, t0)
                deltas.append(_choice(job, idx, new_text, lps, None, tool_delta))
            if c.finish_reason is not None:
                done.add(idx)
                reason = tool_streams.finish_reason(idx, c.finish_reason) if tool_streams else c.finish_reason
                finishes.append(_choice(job, idx, "", None, reason))
        for choices in (deltas, finishes):
            if choices:
                yield _sse_chunk(job, choices)
    prompt, completion = _observe(metrics, job, last)
    if job.include_usage:
        yield _sse_chunk(job, [], _usage(prompt, completion))
    yield "data: [DONE]\n\n"
