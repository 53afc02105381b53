"""CUDA graphs for decode-only steps.

A decode step of B sequences whose block tables span nb blocks is padded to a bucket
(B_pad, nb_pad) and replayed from a graph captured once per bucket. The StepInput's tensors
(token ids, positions, slot mapping, sequence lengths, block table rows, each token's adapter
slot) are copied into static buffers, device to device; padded rows write their K/V to the
runner's scratch block and attend only to it.
Graphs share one memory pool and write their logits (and tokens) into static buffers: only one
replays at a time and its logits are consumed (sampled, read for logprobs) before the next
step replays, so no graph keeps memory of its own beyond what the pool's largest capture needs.

The draw is captured too (lmq.static_sampling): a step whose StepInput carries `sampling` has
its per-row parameters and keys copied in beside the other inputs, and replays the graph of its
`SamplingMode`. Every graph computes at least the greedy tokens (one argmax), so a step the
core samples itself (penalties, grammars, ...) replays the greedy graph and reads the logits.

The base-model buckets are captured when the KV cache is allocated (`capture_all`): a
capture takes tens of milliseconds, and a server whose batches change shape all the time
would otherwise stall on one whenever a new (B_pad, nb_pad) first shows up. Left for first
use: buckets whose decode attention would gather more than `PRECAPTURE_GATHER_BYTES` of K/V
in one layer (long contexts at large batches: the pool keeps its largest capture's memory, so
capturing them all at start would hold memory the KV cache was sized to use), and steps with
adapter tokens, which use the graph of their (bucket, LoRA rank): each token's slot is a
static input too, so any mix of adapters replays the same graph, and draws that are not greedy
(a graph per bucket and mode).

`capture=False` runs the same buffers and forward without capturing (each "replay" runs it
eagerly): the CPU tests cover this class's inputs, padding and draws that way.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from lmq.static_sampling import greedy_params, sample_static
from lmq.step_input import GREEDY, ModelOutput, SamplingMode, StepInput, StepSampling
from lora.ops import LoRAMetadata
from torch_engine.attention_metadata import AttentionMetadata

if TYPE_CHECKING:
    from torch_engine.model_runner import ModelRunner

log = logging.getLogger("lmq")

PRECAPTURE_GATHER_BYTES = 256 << 20  # K and V of one layer, B_pad * nb_pad blocks


def _buckets(limit: int, small: tuple[int, ...]) -> list[int]:
    out = [b for b in small if b < limit]
    b = small[-1] * 2 if small else 1
    while b < limit:
        out.append(b)
        b *= 2
    return sorted(set(out + [limit]))


class _Eager:
    """A graph's stand-in without capture: `replay` runs the captured function itself."""

    def __init__(self, fn) -> None:
        self.replay = fn


GraphKey = tuple[int, int, int, SamplingMode]  # (B_pad, nb_pad, LoRA rank bucket, draw)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int, capture: bool = True) -> None:
        self.runner = runner
        self.capture = capture
        self.batch_buckets = _buckets(max_batch, (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128))
        self.block_buckets = _buckets(max_blocks, (1, 2, 4, 8))
        dev = runner.device
        mb, mbl = self.batch_buckets[-1], self.block_buckets[-1]
        self.token_ids = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(mb, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(mb, mbl, dtype=torch.int32, device=dev)
        self.lora_slots = torch.full((mb,), -1, dtype=torch.int64, device=dev)
        vocab = runner.config.model.vocab_size
        # [mb, 4]: see StepSampling.params. Padded rows keep whatever a row left there: any
        # row's parameters give finite draws, and padded rows' tokens are never read.
        self.sample_params = greedy_params(mb, vocab, dev)
        self.sample_keys = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.logits = torch.empty(mb, vocab, dtype=torch.float32, device=dev)  # [mb, V]
        self.tokens = torch.zeros(mb, dtype=torch.int64, device=dev)  # [mb]: the captured draw's
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph | _Eager] = {}
        self.pool = None
        self.replays = 0  # decode steps served by a graph (tests check that graphs ran at all)

    def capture_all(self) -> None:
        """Capture the base-model buckets within PRECAPTURE_GATHER_BYTES now. The static
        inputs point at the scratch block, so the warm-up forward passes write no K/V that a
        sequence owns."""
        self._pad_rows(slice(None))
        m = self.runner.config.model
        block_bytes = m.kv_bytes_per_token // m.num_layers * self.runner.block_size  # K and V, one layer
        keys = [(bp, nbp, 0, GREEDY) for bp in reversed(self.batch_buckets) for nbp in reversed(self.block_buckets)
                if bp * nbp * block_bytes <= PRECAPTURE_GATHER_BYTES]
        start = time.perf_counter()
        for key in tqdm(keys, desc="capturing decode CUDA graphs", leave=False, disable=None):
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
        log.info("lmq: captured %d decode CUDA graphs in %.1f s", len(keys), time.perf_counter() - start)

    def run(self, step: StepInput) -> ModelOutput:
        """A decode-only step: replays (capturing on first use) the graph of its bucket and draw.
        The logits (and tokens) are views of the static buffers, valid until the next replay."""
        b, nb = step.block_tables.shape
        bp = self.batch_buckets[bisect.bisect_left(self.batch_buckets, b)]
        nbp = self.block_buckets[bisect.bisect_left(self.block_buckets, max(nb, 1))]
        scratch = self.runner.scratch_block
        self.token_ids[:b].copy_(step.token_ids)
        self.positions[:b].copy_(step.positions)
        self.slots[:b].copy_(step.slot_mapping)
        self.context_lens[:b].copy_(step.seq_lens)
        self.block_tables[:b, :nb].copy_(step.block_tables)
        self.block_tables[:b, nb:nbp].fill_(scratch)
        self._pad_rows(slice(b, bp))
        rank = 0
        if step.lora is not None:
            rank = self.runner.lora_rank_bucket(step.lora.rank)
            self.lora_slots[:b].copy_(step.lora.token_slots)
        mode = GREEDY
        if step.sampling is not None:
            mode = step.sampling.mode
            self.sample_params[:b].copy_(step.sampling.params)
            self.sample_keys[:b].copy_(step.sampling.keys)
        key = (bp, nbp, rank, mode)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self.graphs[key].replay()
        self.replays += 1
        logits = self.logits[:b]
        if step.sampling is not None:  # fuses_sampling: one sampling row per sequence, in order
            return ModelOutput(logits, logits[:0], self.tokens[:b])
        if step.num_logit_rows != step.num_seqs or step.num_sample_rows != step.num_seqs:
            logits = logits.index_select(0, step.logit_rows)
        return ModelOutput(logits[:step.num_sample_rows], logits[step.num_sample_rows:])

    def _pad_rows(self, rows: slice) -> None:
        """Padded rows: position 0 in the scratch block, attending to that one slot, base model."""
        scratch = self.runner.scratch_block
        self.token_ids[rows].zero_()
        self.positions[rows].zero_()
        self.slots[rows].fill_(scratch * self.runner.block_size)
        self.context_lens[rows].fill_(1)
        self.block_tables[rows].fill_(scratch)
        self.lora_slots[rows].fill_(-1)

    def _forward(self, bp: int, nbp: int, rank: int) -> torch.Tensor:
        empty = self.token_ids.new_zeros(0)
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bp],
            num_decode_tokens=bp,
            decode_block_tables=self.block_tables[:bp, :nbp],
            decode_context_lens=self.context_lens[:bp],
            prefill_block_tables=empty.view(0, 0),
            prefill_pad_index=empty.view(0, 0),
            prefill_query_pos=empty.view(0, 0),
            prefill_unpad_index=empty,
        )
        slots = self.lora_slots[:bp]
        lora = LoRAMetadata(rank, self.runner.lora_onehot(slots), slots=slots) if rank else None
        model = self.runner.model
        with self.runner.ops.attention_backends(self.runner.device):  # the graph keeps the kernel chosen here
            hidden = model(self.token_ids[:bp], self.positions[:bp], self.runner.kv_caches, meta, lora)
        return model.compute_logits(hidden)

    def _step(self, bp: int, nbp: int, rank: int, mode: SamplingMode) -> None:
        """What a graph holds: the forward pass and the draw, into the static buffers (the
        capture's own outputs are freed back to the pool)."""
        logits = self._forward(bp, nbp, rank)
        self.logits[:bp].copy_(logits)
        sampling = StepSampling(mode, self.sample_params[:bp], self.sample_keys[:bp])
        self.tokens[:bp].copy_(sample_static(self.logits[:bp], sampling, self.runner.sample_race, self.runner.argmax))

    def _capture(self, bp: int, nbp: int, rank: int, mode: SamplingMode) -> torch.cuda.CUDAGraph | _Eager:
        if not self.capture:
            return _Eager(lambda: self._step(bp, nbp, rank, mode))
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(bp, nbp, rank, mode)  # warm-up: kernels chosen, workspaces allocated outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(bp, nbp, rank, mode)
        self.pool = graph.pool()
        return graph
