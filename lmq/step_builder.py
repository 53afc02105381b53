"""StepBuilder: a ScheduledBatch -> one flat StepInput, built once per step in the core.

Host work is per sequence (its token ids, start, length, adapter slot); everything per token
(positions, slot mapping, each token's adapter slot) is derived on the device from those, so no
per-step loop over tokens or over block tables runs in Python. All host values go to the device
in one copy.

The block table is persistent: `BlockTable` keeps one int32 row per running sequence on the
device and writes only what changed since the step that last saw it:

    BlockManager.tables[seq]   [ 7  3  9 12 ]          the live list (it only ever grows)
    mirror (host)              [ 7  3  9 ] (same list object, 3 entries written)
    device row                 [ 7  3  9  x  x ... ]   -> write column 3 := 12

A different list object (the sequence was preempted and re-admitted, or is a new fork) rewrites
the whole row. Rows are freed when a sequence is preempted (`ScheduledBatch.preempted`) or ends
(`release`).

With async scheduling a sequence's last token may be one the step still in flight samples
(`Sequence.num_pending`): its id is not on the host yet, so the step reads it on the device from
that step's sampled tokens (`PendingTokens`), one gather after the single copy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from lmq.block_manager import blocks_for
from lmq.multimodal import ImageEmbeds, chunk_image_rows
from lmq.scheduler import ScheduledBatch, ScheduledSeq
from lmq.step_input import LoRAStepInput, StepInput
from lmq.transfer import to_device


def num_prompt_rows(s: ScheduledSeq) -> int:
    """Rows of the chunk whose logits predict a prompt token (positions < P - 1), for prompt_logprobs."""
    if s.seq.params.prompt_logprobs is None:
        return 0
    return max(min(s.start + s.num_new_tokens, s.seq.num_prompt_tokens - 1) - s.start, 0)


class BlockTable:
    """[max_rows, max_blocks] int32 on the device: row r holds the block ids of the sequence
    assigned to r (entries past its blocks are stale but valid block ids)."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.max_rows, self.max_blocks = max_rows, max_blocks
        self.table = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self.rows: dict[int, int] = {}  # seq_id -> row
        self.mirror: dict[int, tuple[list[int], int]] = {}  # seq_id -> (its live block list, entries written)
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def reset(self) -> None:
        """Forget every row (the cache it indexed is gone)."""
        self.rows.clear()
        self.mirror.clear()
        self.free_rows = list(range(self.max_rows - 1, -1, -1))

    def release(self, seq_id: int) -> None:
        """The sequence's blocks were freed; its row goes back (unknown ids are ignored)."""
        row = self.rows.pop(seq_id, None)
        if row is not None:
            del self.mirror[seq_id]
            self.free_rows.append(row)

    def update(self, seqs: list[ScheduledSeq], writes: list[int], values: list[int]) -> list[int]:
        """Each sequence's row (assigned on first sight); appends the flat table indices and
        block ids of the entries that changed to `writes` / `values`."""
        out = []
        for s in seqs:
            seq_id, blocks = s.seq.seq_id, s.block_table
            row = self.rows.get(seq_id)
            if row is None:
                if not self.free_rows:
                    raise RuntimeError(f"block table is full: {self.max_rows} rows (max_num_seqs) are held")
                row = self.rows[seq_id] = self.free_rows.pop()
                done = 0
            else:
                held, done = self.mirror[seq_id]
                if held is not blocks:  # a new table for this sequence: rewrite the row
                    done = 0
            n = len(blocks)
            if n > done:
                if n > self.max_blocks:
                    raise RuntimeError(f"seq {seq_id} holds {n} blocks > max_blocks={self.max_blocks}")
                base = row * self.max_blocks
                writes.extend(range(base + done, base + n))
                values.extend(blocks[done:n])
            self.mirror[seq_id] = (blocks, n)
            out.append(row)
        return out

    def apply(self, writes: torch.Tensor, values: torch.Tensor) -> None:
        """writes: [W] int64 flat indices, values: [W] block ids (device)."""
        self.table.view(-1).index_copy_(0, writes, values.to(torch.int32))


@dataclass(frozen=True)
class PendingTokens:
    """The tokens a step still in flight samples: `tokens` [B] int64 on the device, and the row
    of each sequence whose next token it is (by seq_id)."""

    tokens: torch.Tensor
    rows: dict[int, int]


@dataclass(frozen=True)
class BuiltStep:
    step: StepInput
    order: list[ScheduledSeq]  # the flat layout's sequences: decodes first, then prefills
    prompt_rows: list[tuple[ScheduledSeq, int]]  # (sequence, rows) of the prompt-logprob rows, in order


class StepBuilder:
    def __init__(self, max_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.blocks = BlockTable(max_seqs, max_blocks_per_seq, device)

    def reset(self) -> None:
        self.blocks.reset()

    def release(self, seq_id: int) -> None:
        self.blocks.release(seq_id)

    def build(self, batch: ScheduledBatch, pending: PendingTokens | None = None) -> BuiltStep:
        for seq in batch.preempted:
            self.blocks.release(seq.seq_id)
        decodes = [s for s in batch.seqs if s.num_new_tokens == 1]
        order = decodes + [s for s in batch.seqs if s.num_new_tokens > 1]
        writes: list[int] = []
        values: list[int] = []
        rows = self.blocks.update(order, writes, values)
        qlens = [s.num_new_tokens for s in order]
        starts = [s.start for s in order]
        seq_lens = [s.start + s.num_new_tokens for s in order]
        qstart = [0, *itertools.accumulate(qlens)]
        ids: list[int] = []
        gather_at: list[int] = []  # flat rows whose token the step in flight samples ...
        gather_from: list[int] = []  # ... and their rows in its sampled tokens
        for s in order:
            chunk = s.seq.token_ids[s.start:s.start + s.num_new_tokens]
            if len(chunk) < s.num_new_tokens:  # the chunk ends at the pending token
                assert pending is not None and len(chunk) == s.num_new_tokens - 1, "one token pending at most"
                gather_at.append(len(ids) + len(chunk))
                gather_from.append(pending.rows[s.seq.seq_id])
                chunk.append(0)
            ids.extend(chunk)
        where = {id(s): q for s, q in zip(order, qstart)}
        logit_rows = [where[id(s)] + s.num_new_tokens - 1 for s in batch.seqs if s.samples]
        num_sample = len(logit_rows)
        prompt_rows = []
        for s, q in zip(order, qstart):
            if n := num_prompt_rows(s):
                logit_rows.extend(range(q, q + n))
                prompt_rows.append((s, n))
        seq_slots, adapter_rows = self._lora_rows(order, qstart, batch.lora_rank)
        img_rows, img_feats = self._image_rows(order, qstart)
        # One host-to-device copy for all of the step's index arrays (each copy has a fixed cost);
        # query_start and seq_lens sit side by side to become int32 in one op.
        arrays = [qstart, seq_lens, ids, starts, rows, logit_rows, seq_slots, adapter_rows, img_rows, writes, values,
                  gather_at, gather_from]
        packed, parts = self._to_device(arrays)
        head = packed[:2 * len(order) + 1].int()
        qstart_t, seq_lens_t = head[:len(order) + 1], head[len(order) + 1:]  # [B + 1], [B]
        ids_t, starts_t, rows_t, logit_t, seq_slots_t, adapter_t, img_t, writes_t, values_t = parts[2:11]
        if gather_at:
            ids_t[parts[11]] = pending.tokens[parts[12]]  # [P]: the tokens the step in flight samples
        if writes:
            self.blocks.apply(writes_t, values_t)
        nb = blocks_for(max(seq_lens), self.block_size)
        block_tables = self.blocks.table[:, :nb].index_select(0, rows_t)  # [B, nb] int32
        b, t = len(order), len(ids)
        if t == b:  # every sequence has one query token (the common decode step)
            seg = None
            positions = starts_t
        else:
            seg = torch.repeat_interleave(torch.arange(b, device=self.device), parts[0].diff(), output_size=t)  # [T]
            positions = starts_t[seg] + torch.arange(t, device=self.device) - parts[0][seg]
        table_rows = torch.arange(b, device=self.device) if seg is None else seg
        bs = self.block_size
        slot_mapping = block_tables[table_rows, positions // bs].long() * bs + positions % bs  # [T]
        lora = None
        if seq_slots:
            token_slots = seq_slots_t if seg is None else seq_slots_t[seg]  # [T]
            lora = LoRAStepInput(batch.lora_rank, token_slots, None if len(adapter_rows) == t else adapter_t,
                                 tuple(seq_slots))
        images = ImageEmbeds(img_t, torch.cat(img_feats).to(self.device)) if img_feats else None
        step = StepInput(ids_t, positions, slot_mapping, qstart_t, seq_lens_t, block_tables, len(decodes),
                         tuple(qlens), tuple(seq_lens), logit_t, num_sample, lora, images)
        return BuiltStep(step, order, prompt_rows)

    @staticmethod
    def _lora_rows(order: list[ScheduledSeq], qstart: list[int], rank: int) -> tuple[list[int], list[int]]:
        """Each sequence's slot and the flat rows of adapter tokens ([], [] when the step has none)."""
        if not rank:
            return [], []
        slots = [s.lora_slot for s in order]
        rows: list[int] = []
        for slot, q, s in zip(slots, qstart, order):
            if slot >= 0:
                rows.extend(range(q, q + s.num_new_tokens))
        return slots, rows

    @staticmethod
    def _image_rows(order: list[ScheduledSeq], qstart: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """Flat rows of the step's image positions and their feature rows ([M] and pieces of [M, hidden]);
        a chunk that stops inside an image takes the features of the positions it covers."""
        rows: list[int] = []
        feats: list[torch.Tensor] = []
        for s, off in zip(order, qstart):
            req = s.seq.request
            if not req.images or s.start >= req.images[-1].end:
                continue
            for i, first, n in chunk_image_rows(s.start, s.num_new_tokens, req.images):
                row = off + req.images[i].offset + first - s.start
                rows.extend(range(row, row + n))
                feats.append(req.image_features[i][first:first + n])
        return rows, feats

    def _to_device(self, arrays: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat int lists -> (the packed int64 tensor on the device, a view of it per list), in one copy."""
        packed = to_device([x for a in arrays for x in a], self.device)
        out, k = [], 0
        for a in arrays:
            out.append(packed[k:k + len(a)])
            k += len(a)
        return packed, out
