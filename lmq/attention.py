"""AttentionMetadata: where one step's tokens sit in the blocked KV cache.

The step's tokens are laid out flat, decode tokens first, then prefill chunks:

    tokens:  [ d0 d1 ... d(Bd-1) | p0 p0 p0 p0 | p1 p1 | ... ]
              one token per        a chunk of each prefilling sequence
              decoding sequence    (q_len > 1)

Decodes attend with one query each; prefill chunks are padded to [Bp, max_q] for one batched
attention call. Keys always come from the cache (the step writes its own K/V first), gathered
through block tables into [B, num_blocks * block_size] positions and masked by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [Bd, nb] int64
    decode_context_lens: torch.Tensor  # [Bd] int64, including the token being decoded
    prefill_block_tables: torch.Tensor  # [Bp, nbp] int64
    prefill_pad_index: torch.Tensor  # [Bp, max_q] int64: prefill token index of each padded query
    prefill_query_pos: torch.Tensor  # [Bp, max_q] int64: absolute position of each padded query
    prefill_unpad_index: torch.Tensor  # [Tp] int64: row in the flattened [Bp * max_q] of each token
    _masks: dict = field(default_factory=dict)  # per (kind, window) mask, built once per step

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
