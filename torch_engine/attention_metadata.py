"""AttentionMetadata: torch_engine's view of where one step's tokens sit in the blocked KV cache,
built on the device from the core's StepInput (lmq.step_input) without waiting for the device.

The step's tokens are laid out flat, decode tokens first, then prefill chunks:

    tokens:  [ d0 d1 ... d(Bd-1) | p0 p0 p0 p0 | p1 p1 | ... ]
              one token per        a chunk of each prefilling sequence
              decoding sequence    (q_len > 1)

Decodes attend with one query each; prefill chunks are padded to [Bp, max_q] for one batched
attention call. Keys always come from the cache (`rotary_write_kv` wrote the step's own K/V
first), gathered through block tables into [B, num_blocks * block_size] positions and masked by
position.

    prefill chunk i (rows qs_i .. qs_i + n_i - 1 of the prefill part), max_q = max n_i:
        pad_index[i, j] = qs_i + min(j, n_i - 1)       padded queries repeat the chunk's last one
        query_pos[i, j] = seq_len_i - n_i + min(j, n_i - 1)
        unpad_index[t]  = i * max_q + (t - qs_i)       for the rows t of chunk i
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmq.block_manager import blocks_for
from lmq.step_input import StepInput


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [Bd, nb] int32 (or int64)
    decode_context_lens: torch.Tensor  # [Bd] int32 (or int64), including the token being decoded
    prefill_block_tables: torch.Tensor  # [Bp, nbp] int32 (or int64)
    prefill_pad_index: torch.Tensor  # [Bp, max_q] int64: prefill token index of each padded query
    prefill_query_pos: torch.Tensor  # [Bp, max_q] int64: absolute position of each padded query
    prefill_unpad_index: torch.Tensor  # [Tp] int64: row in the flattened [Bp * max_q] of each token
    # the same prefill chunks as varlen kernels read them (turbomind.ops.prefill_attention)
    prefill_query_start: torch.Tensor | None = None  # [Bp + 1] int32: first prefill row of each chunk, then Tp
    prefill_seq_lens: torch.Tensor | None = None  # [Bp] int32: context length after the chunk
    prefill_max_query_len: int = 0
    _masks: dict = field(default_factory=dict)  # per (kind, window) mask, built once per step

    @staticmethod
    def from_step(step: StepInput, block_size: int) -> AttentionMetadata:
        """Views of the step's tensors for the decodes; the prefill indices computed on the device
        from query_start / seq_lens (shapes from the host tuples: no device sync)."""
        nd, b, dev = step.num_decodes, step.num_seqs, step.token_ids.device
        ctx = step.context_lens
        nbd = blocks_for(max(ctx[:nd]), block_size) if nd else 0
        meta = dict(slot_mapping=step.slot_mapping, num_decode_tokens=nd,
                    decode_block_tables=step.block_tables[:nd, :nbd], decode_context_lens=step.seq_lens[:nd])
        if nd == b:
            empty = step.positions.new_zeros(0)
            return AttentionMetadata(**meta, prefill_block_tables=step.block_tables[nd:, :0],
                                     prefill_pad_index=empty.view(0, 0), prefill_query_pos=empty.view(0, 0),
                                     prefill_unpad_index=empty)
        max_q, tp = max(step.query_lens[nd:]), step.num_tokens - nd
        qs = step.query_start[nd:].long() - nd  # [Bp + 1] prefill rows, from 0
        n = qs.diff()  # [Bp]
        j = torch.minimum(torch.arange(max_q, device=dev)[None, :], n[:, None] - 1)  # [Bp, max_q]
        seg = torch.repeat_interleave(torch.arange(b - nd, device=dev), n, output_size=tp)  # [Tp]
        return AttentionMetadata(
            **meta,
            prefill_block_tables=step.block_tables[nd:, :blocks_for(max(ctx[nd:]), block_size)],
            prefill_pad_index=qs[:-1, None] + j,
            prefill_query_pos=(step.seq_lens[nd:].long() - n)[:, None] + j,
            prefill_unpad_index=seg * max_q + torch.arange(tp, device=dev) - qs[seg],
            prefill_query_start=qs.int(), prefill_seq_lens=step.seq_lens[nd:], prefill_max_query_len=max_q,
        )

    @property
    def num_prefill_seqs(self) -> int:
        return self.prefill_block_tables.shape[0]

    def decode_mask(self, block_size: int, window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, L] bool: key position < context length (and inside the window)."""
        key = ("decode", window)
        if key not in self._masks:
            ctx = self.decode_context_lens[:, None]  # [Bd, 1]
            kpos = torch.arange(self.decode_block_tables.shape[1] * block_size,
                                device=ctx.device)[None, :]  # [1, L]
            mask = kpos < ctx
            if window is not None:
                mask &= kpos > ctx - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, block_size: int, window: int | None) -> torch.Tensor:
        """[Bp, 1, max_q, L] bool: causal by absolute position (and inside the window)."""
        key = ("prefill", window)
        if key not in self._masks:
            qpos = self.prefill_query_pos[:, :, None]  # [Bp, max_q, 1]
            kpos = torch.arange(self.prefill_block_tables.shape[1] * block_size,
                                device=qpos.device)[None, None, :]  # [1, 1, L]
            mask = kpos <= qpos
            if window is not None:
                mask &= kpos > qpos - window
            self._masks[key] = mask[:, None]
        return self._masks[key]
