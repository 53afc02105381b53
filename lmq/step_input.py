"""The engine seam: what the core hands a backend's model runner each step, and what it gets back.

The core (lmq.step_builder) flattens a scheduled batch once into a `StepInput`; a runner
(torch_engine's, turbomind's) turns it into its own attention metadata and runs the model.
No runner reads a `Sequence` or a `ScheduledBatch`.

    token rows:  [ d0 d1 ... d(Bd-1) | p0 p0 p0 p0 | p1 p1 | ... ]
                   one token per        a chunk of each prefilling sequence
                   decoding sequence    (query length > 1)

Sequence b's tokens are rows query_start[b] .. query_start[b + 1] - 1, at positions
seq_lens[b] - query_lens[b] .. seq_lens[b] - 1; its keys are positions 0 .. seq_lens[b] - 1 of
the blocked cache, reached through block_tables[b]. The runner writes the step's own K/V (at
slot_mapping) before attention reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from lmq.multimodal import ImageEmbeds
from lora.slot_image import SlotImage


@dataclass(frozen=True)
class LoRAStepInput:
    """Which adapter slot each token uses; present only when the step has adapter tokens."""

    rank: int  # the largest adapter rank among the step's sequences (> 0); runners may round it up
    token_slots: torch.Tensor  # [T] int64 device slot of each token, -1 = base model
    adapter_rows: torch.Tensor | None  # [T'] int64 rows of the tokens whose slot >= 0; None: every row
    seq_slots: tuple[int, ...]  # [B] host: slot of each sequence (its tokens are one segment)


@dataclass(frozen=True)
class SamplingMode:
    """Which of the draw's ops a step runs (one captured graph each)."""

    random: bool = False  # some row draws (temperature > 0); all greedy: argmax alone
    min_p: bool = False  # some drawing row has min_p > 0
    top: bool = False  # some drawing row keeps less than the vocabulary by top_k or top_p


GREEDY = SamplingMode()


def greedy_row(vocab: int) -> tuple[float, float, float, float]:
    """`StepSampling.params` of a greedy row: temperature 0, no top-p, min-p or top-k."""
    return (0.0, 1.0, 0.0, float(vocab))


@dataclass(frozen=True)
class StepSampling:
    """One decode step's draws as device tensors, rows in the step's sequence order, for a
    runner that samples inside the step (lmq.static_sampling)."""

    mode: SamplingMode
    # [B, 4] float32 per row: temperature (0: greedy), top_p, min_p, top_k (the vocabulary
    # size where off; float32 holds integers exactly up to 2^24)
    params: torch.Tensor
    keys: torch.Tensor  # [B] int64: each drawing row's race key (`race_keys`); 0 for greedy rows


@dataclass(frozen=True)
class StepInput:
    """One step's tokens, flat. Tensors are on the runner's device; tuples are host copies of
    what shapes and loop bounds need (reading them never waits for the device)."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token
    query_start: torch.Tensor  # [B + 1] int32: first row of each sequence, then T
    seq_lens: torch.Tensor  # [B] int32: context length after this step (keys to attend to)
    # [B, nb] int32: rows of the core's persistent block table, nb covering every sequence's
    # context; a sequence's entries past its own blocks are stale but valid block ids.
    block_tables: torch.Tensor
    num_decodes: int  # the first num_decodes sequences have one query token each
    query_lens: tuple[int, ...]  # [B] host
    context_lens: tuple[int, ...]  # [B] host copy of seq_lens
    # [Ns + Np] int64: rows whose logits the core wants: one per sampling sequence (in the
    # scheduler's batch order), then the rows predicting prompt tokens (prompt_logprobs).
    logit_rows: torch.Tensor
    num_sample_rows: int
    lora: LoRAStepInput | None = None
    images: ImageEmbeds | None = None  # features replacing the embeddings of image rows
    # the draws, where the runner samples this step itself (`ModelRunner.fuses_sampling`)
    sampling: StepSampling | None = None

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs

    @property
    def num_logit_rows(self) -> int:
        return self.logit_rows.shape[0]


@dataclass(frozen=True)
class ModelOutput:
    sample_logits: torch.Tensor  # [Ns, V] float32, in StepInput.logit_rows order
    prompt_logits: torch.Tensor  # [Np, V] float32: the prompt-logprob rows, in order
    tokens: torch.Tensor | None = None  # [Ns] int64: drawn by the runner from StepInput.sampling


class ModelRunner(Protocol):
    """What a backend provides (lmq.backends builds it). It owns the model and the KV cache."""

    device: torch.device
    # The sampler's draw as one device op where the backend has it (lmq.sampling.Sampler's
    # `race`: scaled, filtered float32 logits [R, V] and int64 keys [R] -> tokens [R]); None:
    # the sampler's torch ops.
    sample_race: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

    def profile_num_blocks(self) -> int:
        """KV blocks that fit next to the model and a peak-size step."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The cache (plus any scratch block of the runner's own), and CUDA graphs over it."""

    def load_lora_slot(self, slot: int, image: SlotImage | None) -> None:
        """Write a packed adapter into a device slot (None: empty it)."""

    def fuses_sampling(self, step: StepInput) -> bool:
        """Whether `execute` would draw this step's tokens itself given `StepInput.sampling` (a
        decode step it replays from a CUDA graph, the draw captured with it)."""

    def execute(self, step: StepInput) -> ModelOutput:
        """Queue the step's forward pass on the device (and, with `StepInput.sampling`, its draw:
        `ModelOutput.tokens`); the logits may still be computing."""
