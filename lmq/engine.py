"""LLMEngine: add_request / step / abort over the scheduler, a model runner and the sampler."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmq.backends import make_runner
from lmq.block_manager import BlockManager, blocks_for
from lmq.config import EngineConfig
from lmq.multimodal import ImageInput, ProcessedImage, cache_key_ids, expand_image_tokens
from lmq.sampling import (
    SampledTokens,
    Sampler,
    SamplerRow,
    SamplingParams,
    banned_token_ids,
    step_seed,
    token_logprobs,
    truncate_prompt,
    with_bad_words_token_ids,
)
from lmq.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from lmq.sequence import Request, RequestOutput, Sequence
from lmq.step_builder import PendingTokens, StepBuilder
from lmq.step_input import StepInput
from lmq.structured import Grammars, check_guided
from lmq.tokenizer import Detokenizer, Tokenizer
from lmq.transfer import to_device
from lora.adapter import LoRAAdapter
from lora.manager import Adapter, AdapterManager

if TYPE_CHECKING:
    from vision.pool import EncoderPool

log = logging.getLogger("lmq")


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_aborted: int  # requests ended by an abort (client gone, shutdown, broken adapter, failed step) so far
    # Adapter bookkeeping; both are 0 when nothing runs, so anything else after a drain is a leak.
    num_lora_pins: int = 0  # running sequences pinning a device slot
    num_lora_requests: int = 0  # unfinished requests over every adapter, unloaded ones too


@dataclass
class StepInFlight:
    """A step queued on the device by `LLMEngine.launch_step`, not yet finished."""

    batch: ScheduledBatch
    seqs: list[Sequence]  # the sequences that sample, in the sampler's row order
    sampled: SampledTokens | None  # None: nothing samples this step
    prompt_logits: list[tuple[ScheduledSeq, torch.Tensor]]  # [n, V] rows predicting prompt tokens, per chunk
    # Async scheduling: the sequences whose token the next step reads on the device (their
    # num_pending counts it until `finish_step`), and whether the next step may be launched
    # before this one finishes (every sampled sequence is pended or certain to end by length).
    pended: list[Sequence] = field(default_factory=list)
    overlaps: bool = False
    # The requests `finish_step` changed so far (also when it failed midway).
    touched: dict[str, Request] = field(default_factory=dict)


def validate_request(config: EngineConfig, ids: list[int], params: SamplingParams) -> None:
    """Refuse a request the engine could never serve. Reads only the (final, profiled) config, so
    any thread, and a process without the engine, may call it."""
    vocab = config.model.vocab_size
    max_model_len = config.scheduler.max_model_len
    if not ids:
        raise ValueError("prompt is empty: at least 1 token is required")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is out of range [0, {vocab})")
    if out_of := params.token_ids_out_of(vocab):
        raise ValueError(f"{out_of[0]}: token id {out_of[1]} is out of range [0, {vocab})")
    want = len(ids) + (params.max_tokens or 1)
    if want > max_model_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {want} exceeds "
                         f"the context length max_model_len={max_model_len}")
    num_blocks = config.cache.num_kv_blocks  # None only in a config not yet profiled
    blocks = blocks_for(want, config.cache.block_size)
    if num_blocks is not None and blocks > num_blocks:
        raise ValueError(f"prompt + max_tokens = {want} tokens needs {blocks} KV blocks but the cache has "
                         f"only num_kv_blocks={num_blocks}")
    if params.n > config.scheduler.max_num_seqs:
        raise ValueError(f"n={params.n} exceeds max_num_seqs={config.scheduler.max_num_seqs}")
    if params.guided_decoding is not None:
        check_guided(params.guided_decoding)


def _encoder_pool(config: EngineConfig) -> EncoderPool | None:
    """A vision model's encoder replicas: on `vision_devices`, by default every visible GPU when
    the engine runs on CUDA (else the engine's device)."""
    if config.model.vision is None:
        return None
    from vision.pool import EncoderPool

    devices = list(config.vision_devices)
    if not devices:
        cuda = config.device.startswith("cuda")
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else [config.device]
    return EncoderPool(config.model, devices, config.vision_max_batch_size, config.device)


class LLMEngine:
    """Owns one model. Not thread-safe: one thread calls add_request/step/abort."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.runner = make_runner(config)
        self.encoders = _encoder_pool(config)  # before profiling: its replicas' memory is not KV cache
        self.encoding: dict[str, tuple[Request, Future]] = {}  # requests waiting for their images' features
        self.failures: list[tuple[str, Exception]] = []  # requests ended by an error, for take_failures
        num_blocks = config.cache.num_kv_blocks or self._cap_blocks(config, self.runner.profile_num_blocks())
        self.config = config.with_num_kv_blocks(num_blocks)
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.adapters = None if config.lora is None else \
            AdapterManager(config.lora, config.model, self.runner.load_lora_slot, config.device.startswith("cuda"))
        self._adapter_errors = 0
        self.num_aborted = 0
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.adapters)
        bs = config.cache.block_size
        self.builder = StepBuilder(config.scheduler.max_num_seqs, blocks_for(config.scheduler.max_model_len, bs), bs,
                                   self.runner.device)
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.sampler = Sampler(torch.Generator(device=self.runner.device).manual_seed(config.seed),
                               tokenizer.token_texts, self.runner.sample_race)
        self.requests: dict[str, Request] = {}
        self.streaming: set[str] = set()
        self._seq_ids = itertools.count()
        eos = set(config.model.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._grammars: Grammars | None = None  # built with the first guided request
        # Async scheduling (see `step`): the step still running, and the tokens it samples that
        # the next step reads on the device.
        self.in_flight: StepInFlight | None = None
        self._pending: PendingTokens | None = None
        log.info("lmq: %s on %s (%s), %d KV blocks of %d tokens", config.model.architecture, config.device,
                 str(config.model.dtype).removeprefix("torch."), num_blocks, config.cache.block_size)

    @staticmethod
    def _cap_blocks(config: EngineConfig, profiled: int) -> int:
        """No more blocks than max_num_seqs sequences of full length can use."""
        per_seq = blocks_for(config.scheduler.max_model_len, config.cache.block_size)
        return min(profiled, config.scheduler.max_num_seqs * per_seq)

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    stream: bool = False, adapter: str | None = None, *, validated: bool = False,
                    images: list[ImageInput] | list[ProcessedImage] | None = None) -> None:
        """Queue a request, for the base model or the loaded adapter named `adapter`.
        `stream=True` detokenizes every step (for streaming deltas). `validated=True`: the
        caller already ran `validate_request` on this engine's config (AsyncEngine's front end
        does, in the server process). images: ProcessedImage per placeholder token of the
        prompt (expanded here), or ImageInput of an already expanded prompt; the request is
        scheduled once the encoder pool has their features."""
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        ids = truncate_prompt(ids, params, self.max_model_len, bool(images))
        images = list(images or [])
        if images and isinstance(images[0], ProcessedImage):
            ids, images = expand_image_tokens(ids, images, self.config.model.vision)
        if images and self.encoders is None:
            raise ValueError("this model does not accept images (it is a text-only model)")
        if not validated:
            validate_request(self.config, ids, params)
        params = with_bad_words_token_ids(params, lambda w: self.tokenizer.encode(w, add_special_tokens=False))
        req = Request(request_id, text, ids, params, adapter=self._adapter(adapter), images=images)
        seq = self._new_seq(req, 0, list(ids))
        self.requests[request_id] = req
        if req.adapter is not None:
            self.adapters.retain(req.adapter)
        if stream:
            self.streaming.add(request_id)
        if images:
            req.key_prompt_ids = cache_key_ids(ids, images)
            self.encoding[request_id] = (req, self.encoders.submit([im.image for im in images]))
        else:
            self.scheduler.add(seq)

    def _admit_encoded(self) -> bool:
        """Requests whose images are encoded go to the scheduler; those whose encoding failed end
        with no output: their error goes to `take_failures`. Returns whether any failed."""
        failed = False
        for rid, (req, future) in list(self.encoding.items()):
            if not future.done():
                continue
            del self.encoding[rid]
            error = future.exception()
            if error is None:
                req.image_features = future.result()
                self.scheduler.add(req.seqs[0])
            else:
                self.failures.append((rid, error))
                self._abort(req)
                failed = True
        return failed

    def take_failures(self) -> list[tuple[str, Exception]]:
        """(request id, error) of requests that ended with an error since the last call."""
        out, self.failures = self.failures, []
        return out

    # -- adapters ------------------------------------------------------------------------------
    def _adapter(self, name: str | None) -> Adapter | None:
        return None if name is None else self._lora().get(name)

    def _lora(self) -> AdapterManager:
        if self.adapters is None:
            raise ValueError("LoRA is not enabled for this engine: start it with adapters or enable_lora=True")
        return self.adapters

    def load_adapter(self, name: str, path: str) -> None:
        """Read, validate and register a peft adapter (AdapterError says what is wrong)."""
        manager = self._lora()
        if name in manager.registry:  # before reading the folder; add() checks again
            raise ValueError(f"adapter name {name!r} is already loaded")
        self.add_adapter(name, manager.read(path))

    def add_adapter(self, name: str, weights: LoRAAdapter) -> None:
        """Register an adapter already read (and validated) by `AdapterManager.read`."""
        self._lora().add(name, weights)

    def unload_adapter(self, name: str) -> None:
        """New requests can no longer name it; requests already accepted finish first."""
        self._lora().remove(name)

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        guided = req.params.guided_decoding
        matcher = None if guided is None else self.grammars().matcher(guided)  # ValueError: cannot compile
        seq = Sequence(next(self._seq_ids), req, index, token_ids, len(req.prompt_token_ids), matcher=matcher)
        self.detokenizer.start(seq)
        req.seqs.append(seq)
        return seq

    def grammars(self) -> Grammars:
        """The structured-output compiler for this engine's tokenizer (built on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer.hf, self.config.model.vocab_size, sorted(self.eos_token_ids),
                                      self.runner.device)
        return self._grammars

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its KV blocks return to the pool at once."""
        req = self.abort_request(request_id)
        return None if req is None else RequestOutput.from_request(req)

    def abort_request(self, request_id: str) -> Request | None:
        """`abort`, returning the request itself (None if unknown) for `outputs`."""
        req = self.requests.get(request_id)
        if req is not None:
            self._abort(req)
        return req

    def _abort(self, req: Request) -> None:
        if not req.is_finished:
            self.num_aborted += 1
        req.aborted = True
        for seq in req.seqs:
            if not seq.is_finished:
                self._decode_pending(seq)
                if not seq.is_finished:  # (unless that text completed a stop string)
                    seq.finish("abort")
                self._remove(seq)
            seq.matcher = None
        self._forget(req)

    def _forget(self, req: Request) -> None:
        """The request is over: drop it and release its adapter."""
        self.requests.pop(req.request_id, None)
        self.encoding.pop(req.request_id, None)  # (an encoding still running finishes unused)
        self.streaming.discard(req.request_id)
        if req.adapter is not None:
            self.adapters.release(req.adapter)

    def _remove(self, seq: Sequence) -> None:
        """The sequence leaves the scheduler (its blocks are freed) and its block-table row."""
        self.scheduler.remove(seq)
        self.builder.release(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        bm, lora = self.block_manager, self.adapters
        pins, requests = (0, 0) if lora is None else (len(lora.pins), lora.num_requests)
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_free_blocks,
                           bm.num_blocks, bm.prefix_queries, bm.prefix_hits, self.scheduler.num_preemptions,
                           self.num_aborted, pins, requests)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample. Returns an output for every request that finished,
        and for every streaming request that changed. With async scheduling, the step launched
        here runs on while the previous one is read back, and the outputs are the previous one's."""
        aborted = self.abort_broken_adapters()
        if not self.config.scheduler.async_scheduling:
            return self.outputs(aborted + self.finish_step(self.launch_step()))
        done: list[Request] = []
        prev, self.in_flight = self.in_flight, None
        try:
            if prev is not None and not prev.overlaps:  # the next step needs its tokens on the host
                done += self.finish_step(prev)
                prev = None
            if self.has_unfinished():
                self.in_flight = self.launch_step()
        finally:  # also when the launch fails: the tokens in flight are appended, none left pending
            if prev is not None:
                done += self.finish_step(prev)
        return self.outputs(aborted + done)

    def launch_step(self) -> StepInFlight:
        """Schedule and queue the step's forward pass and sampling on the device; the host does
        not wait for them (see `finish_step`)."""
        failed = self._admit_encoded() if self.encoding else False
        batch = self.scheduler.schedule()
        if batch.is_empty:
            if self.adapters is not None:  # waiting only for adapters being read from disk
                self.adapters.wait_for_reads(timeout=0.05)
            if self.encoding and not failed:  # or for images being encoded
                wait([f for _, f in self.encoding.values()], timeout=0.05, return_when=FIRST_COMPLETED)
            return StepInFlight(batch, [], None, [], overlaps=self.config.scheduler.async_scheduling)
        built = self.builder.build(batch, self._pending)
        step, rows = self._fuse_sampling(batch, built.step)
        out = self.runner.execute(step)
        self.scheduler.on_step_done(batch)
        forks = any(s.seq.request.needs_fork for s in batch.seqs if s.samples)
        seqs, logits = self._expand_forks(batch, out.sample_logits)
        guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if guided:  # host work while the device runs the forward pass
            bitmask = self._grammars.fill([seqs[i].matcher for i in guided])
            logits = self._grammars.apply(logits, guided, bitmask)
        sampled = None
        if out.tokens is not None:  # drawn by the runner, inside its step
            sampled = self.sampler.finish(out.tokens, logits, rows)
        elif seqs:
            sampled = self.sampler.launch(logits, [self._sampler_row(s) for s in seqs])
        prompt_logits, k = [], 0
        for s, n in built.prompt_rows:
            prompt_logits.append((s, out.prompt_logits[k:k + n]))
            k += n
        # Prompt logprobs are read back in `finish_step` (their step is a prefill): kept synchronous.
        pended = self._pend(seqs, forks or bool(prompt_logits)) if self.config.scheduler.async_scheduling else None
        self._pending = None
        if pended:
            for seq in pended:
                seq.num_pending += 1
            rows = {seq.seq_id: i for i, seq in enumerate(seqs)}
            self._pending = PendingTokens(sampled.tokens, {seq.seq_id: rows[seq.seq_id] for seq in pended})
        return StepInFlight(batch, seqs, sampled, prompt_logits, pended or [], pended is not None)

    def _fuse_sampling(self, batch: ScheduledBatch, step: StepInput) -> tuple[StepInput, list[SamplerRow] | None]:
        """The step with its draws for the runner to run inside its step (a replayed CUDA graph)
        where it can and every draw needs only the logits; else the step as it was and None.
        Grammars (their masks are filled while the forward pass runs) and forks stay with the
        sampler, as do the rows `Sampler.step_sampling` declines."""
        if not self.runner.fuses_sampling(step):
            return step, None
        seqs = [s.seq for s in batch.seqs if s.samples]
        if any(seq.matcher is not None or seq.request.needs_fork for seq in seqs):
            return step, None
        rows = [self._sampler_row(seq) for seq in seqs]
        sampling = self.sampler.step_sampling(rows, self.config.model.vocab_size, self.runner.device)
        return (step, None) if sampling is None else (dataclasses.replace(step, sampling=sampling), rows)

    def _pend(self, seqs: list[Sequence], synchronous: bool) -> list[Sequence] | None:
        """Async scheduling: the sampled sequences the next step may compute before this step's
        tokens reach the host (all but those certain to end by length), or None when one of them
        needs its token on the host first: a grammar's next mask, penalties, min_tokens and bad
        words read the output so far; `synchronous`: the step forks samples or has prompt logprobs."""
        if synchronous:
            return None
        pended = []
        for seq in seqs:
            p = seq.params
            if seq.matcher is not None or p.needs_penalties or p.min_tokens or p.bad_words_token_ids:
                return None
            after = seq.num_pending + 1  # tokens appended once this step and the one before are read
            if seq.num_output_tokens + after < (p.max_tokens or self.max_model_len) and \
                    seq.num_tokens + after < self.max_model_len:
                pended.append(seq)
        return pended

    def finish_step(self, step: StepInFlight) -> list[Request]:
        """Wait for the step's tokens and append them (stop tokens, stop strings and length end
        sequences here, and finished requests leave the engine). Returns the requests the step
        changed, for `outputs`."""
        touched = step.touched
        for seq in step.pended:  # first: also when reading the step back fails
            seq.num_pending -= 1
        sampled = step.sampled.result() if step.sampled is not None else None
        for s, logits in step.prompt_logits:
            if not s.seq.is_finished:
                self._prompt_logprobs(s.start, s.seq, logits)
        if sampled is not None:
            now = time.monotonic()
            for seq, tok, lp in zip(step.seqs, sampled.token_ids, sampled.logprobs):
                if seq.is_finished:  # async scheduling: aborted, or ended by the step before, while in flight
                    continue
                self._append(seq, tok, lp)
                req = seq.request
                req.first_token_time = req.first_token_time or now
                touched[req.request_id] = req
                if req.is_finished:
                    self._forget(req)
        return list(touched.values())

    def outputs(self, reqs: list[Request]) -> list[RequestOutput]:
        """Outputs of requests a step changed: every finished one and every streaming one. May
        run after the next step was launched (the engine process builds them while the device
        computes), so streaming text is decoded here rather than token by token in the step."""
        outs = []
        for req in reqs:
            if req.is_finished or req.request_id in self.streaming:
                for seq in req.seqs:
                    if not seq.is_finished:
                        self._decode_pending(seq)
                outs.append(RequestOutput.from_request(req))
        return outs

    def _decode_pending(self, seq: Sequence) -> None:
        """Decode tokens the step appended without text: streaming text waits for `outputs`,
        and a request without stop strings or streaming is decoded whole only when it ends."""
        if seq.read_offset < seq.num_tokens:
            self.detokenizer.step(seq)

    def abort_broken_adapters(self) -> list[Request]:
        """Requests whose adapter could not be read back from disk end with finish_reason
        "abort"; returns them. Called before each step."""
        if self.adapters is None or self.adapters.num_errors == self._adapter_errors:
            return []
        self._adapter_errors = self.adapters.num_errors
        broken = [req for req in self.requests.values() if req.adapter is not None and req.adapter.error]
        for req in broken:
            self._abort(req)
        return broken

    def _sampler_row(self, seq: Sequence) -> SamplerRow:
        p = seq.params
        banned = []
        if p.min_tokens or p.bad_words_token_ids:  # tokens masked this step, from the output so far
            # A grammar decides when a guided sequence may stop: min_tokens never bans its end.
            stops = frozenset() if p.ignore_eos or seq.matcher is not None else self.eos_token_ids
            banned = banned_token_ids(p, seq.output_token_ids, stops)
        # A seeded sample's draw: its seed (+ sample index) and step offset, nothing else.
        seed = None if p.seed is None else step_seed(p.seed + seq.sample_index, seq.num_output_tokens + seq.num_pending)
        if p.needs_penalties:  # only penalties read the history; skip copying it otherwise
            return SamplerRow(p, seq.prompt_token_ids, seq.output_token_ids, None, banned, seed)
        return SamplerRow(p, [], [], None, banned, seed)

    def _expand_forks(self, batch: ScheduledBatch, logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """A request with n > 1 forks when its prompt is done: the samples share its full blocks
        and each draws its first token from the same logits row."""
        seqs = [s.seq for s in batch.seqs if s.samples]
        extra_seqs, extra_rows = [], []
        for i, seq in enumerate(seqs):
            if not seq.request.needs_fork:
                continue
            prompt = seq.prompt_token_ids
            for k in range(1, seq.params.n):
                child = self._new_seq(seq.request, k, list(prompt))
                self.block_manager.fork(seq.seq_id, child.seq_id, len(prompt))
                child.num_computed_tokens = len(self.block_manager.block_table(child.seq_id)) * \
                    self.block_manager.block_size
                self.scheduler.add_running(child)
                extra_seqs.append(child)
                extra_rows.append(i)
        if extra_rows:
            logits = torch.cat([logits, logits[to_device(extra_rows, logits.device)]])
        return seqs + extra_seqs, logits

    def _prompt_logprobs(self, start: int, seq: Sequence, logits: torch.Tensor) -> None:
        """logits: [n, V] for prompt positions start..start+n-1, each predicting the next token.
        Rows already recorded (a recompute after preemption, a forked sample) are skipped."""
        req = seq.request
        if not req.prompt_logprobs:
            req.prompt_logprobs.append(None)  # nothing predicts the first token
        skip = len(req.prompt_logprobs) - (start + 1)
        if skip >= logits.shape[0]:
            return
        logits = logits[max(skip, 0):]
        first = len(req.prompt_logprobs)
        targets = torch.tensor(req.prompt_token_ids[first:first + logits.shape[0]], device=logits.device)
        k = req.params.prompt_logprobs
        req.prompt_logprobs.extend(token_logprobs(logits.log_softmax(-1), targets, [k] * len(targets),
                                                  self.tokenizer.token_texts))

    def _append(self, seq: Sequence, token: int, logprobs: dict | None) -> None:
        seq.token_ids.append(token)
        if seq.num_computed_tokens >= seq.num_tokens:  # async: the next step already computed its K/V
            self.scheduler.cache_computed(seq)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        keep_last = False  # the token ends the sequence but belongs to its text
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # Only when nothing was left to sample (every token masked, e.g. by bad_words too).
            log.warning("lmq: sequence %d sampled token %d that its grammar rejects; ending it", seq.seq_id, token)
            seq.finish("abort")
        elif seq.matcher is not None and seq.matcher.is_stopped():
            seq.finish("stop")  # the grammar is complete: nothing but a stop token could follow
            keep_last = token not in self.eos_token_ids and token not in p.stop_token_ids
        elif token in p.stop_token_ids:
            seq.finish("stop", token)
        elif not p.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        hide_stop_token = seq.is_finished and not p.include_stop_str_in_output and not keep_last  # like vLLM
        if p.stop and not hide_stop_token:  # stop strings are looked for token by token
            self.detokenizer.step(seq)
        if not seq.is_finished and (seq.num_output_tokens >= (p.max_tokens or self.max_model_len)
                                    or seq.num_tokens >= self.max_model_len):
            seq.finish("length")
        if seq.is_finished:
            self._remove(seq)
            seq.matcher = None
            if not isinstance(seq.stop_reason, str):  # a stop string already cut the text
                # Whole text at once: also releases what incremental decoding held back (an
                # incomplete character at the end).
                seq.text = self.detokenizer.full_text(seq, seq.num_tokens - hide_stop_token)
