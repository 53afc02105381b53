"""lmq.step_builder: the flat StepInput against per-token formulas written out here, the
persistent block table's incremental writes, and torch_engine's AttentionMetadata.from_step
against the padded layout spelled out by hand."""

from __future__ import annotations

import torch

from conftest import SEED
from lmq.sampling import SamplingParams
from lmq.scheduler import ScheduledBatch, ScheduledSeq
from lmq.sequence import Request, Sequence
from lmq.step_builder import StepBuilder
from torch_engine.attention_metadata import AttentionMetadata

BS = 4


def _seq(seq_id: int, n_tokens: int, g: torch.Generator, prompt_logprobs: int | None = None) -> Sequence:
    ids = torch.randint(3, 100, (n_tokens,), generator=g).tolist()
    req = Request(f"r{seq_id}", None, ids, SamplingParams(prompt_logprobs=prompt_logprobs))
    return Sequence(seq_id, req, 0, ids, n_tokens)


def _batch(g: torch.Generator, tables: dict[int, list[int]]) -> tuple[ScheduledBatch, list[Sequence]]:
    """A prefill chunk, two decodes, a chunk that does not reach the end (no sample), in that
    (scheduler) order; tables[seq_id] are the live block lists."""
    seqs = [_seq(0, 11, g), _seq(1, 9, g), _seq(2, 14, g), _seq(3, 20, g, prompt_logprobs=1)]
    spans = [(3, 8), (8, 1), (13, 1), (4, 6)]  # (start, num_new)
    for s, (start, n) in zip(seqs, spans):
        tables.setdefault(s.seq_id, torch.randperm(40, generator=g)[:-(-(start + n) // BS)].tolist())
    return ScheduledBatch([ScheduledSeq(s, st, n, tables[s.seq_id]) for s, (st, n) in zip(seqs, spans)]), seqs


def test_step_input_matches_per_token_formulas() -> None:
    g = torch.Generator().manual_seed(SEED)
    tables: dict[int, list[int]] = {}
    batch, seqs = _batch(g, tables)
    built = StepBuilder(8, 10, BS, torch.device("cpu")).build(batch)
    step = built.step
    order = [batch.seqs[i] for i in (1, 2, 0, 3)]  # decodes first, each group in batch order
    assert [s.seq.seq_id for s in built.order] == [s.seq.seq_id for s in order] and step.num_decodes == 2
    ids, pos, slots = [], [], []
    for s in order:
        for p in range(s.start, s.start + s.num_new_tokens):
            ids.append(s.seq.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[p // BS] * BS + p % BS)
    assert step.token_ids.tolist() == ids and step.positions.tolist() == pos and step.slot_mapping.tolist() == slots
    assert step.query_start.dtype == torch.int32 and step.query_start.tolist() == [0, 1, 2, 10, 16]
    assert step.seq_lens.tolist() == list(step.context_lens) == [9, 14, 11, 10]
    nb = step.block_tables.shape[1]
    for row, s in zip(step.block_tables.tolist(), order):
        own = min(len(s.block_table), nb)
        assert row[:own] == s.block_table[:own]
    # sampling rows in batch order (seq 3's chunk stops short of its end), then seq 3's prompt rows
    assert step.num_sample_rows == 3 and step.logit_rows.tolist() == [9, 0, 1, 10, 11, 12, 13, 14, 15]
    assert [(s.seq.seq_id, n) for s, n in built.prompt_rows] == [(3, 6)]


def test_block_table_writes_only_what_changed() -> None:
    g = torch.Generator().manual_seed(SEED + 1)
    tables: dict[int, list[int]] = {}
    builder = StepBuilder(8, 10, BS, torch.device("cpu"))
    batch, _ = _batch(g, tables)
    writes: list[int] = []
    values: list[int] = []
    builder.blocks.update(batch.seqs, writes, values)
    assert len(writes) == sum(len(t) for t in tables.values())  # first sight: whole rows
    builder.blocks.apply(torch.tensor(writes), torch.tensor(values))
    tables[1].append(33)  # seq 1 grew by a block
    tables[2] = [5, 6, 7, 8]  # seq 2 got a new table (preempted and re-admitted)
    again = ScheduledBatch([ScheduledSeq(s.seq, s.start, s.num_new_tokens, tables[s.seq.seq_id]) for s in batch.seqs])
    writes, values = [], []
    rows = builder.blocks.update(again.seqs, writes, values)
    assert values == [33, 5, 6, 7, 8]
    builder.blocks.apply(torch.tensor(writes), torch.tensor(values))
    for s, row in zip(again.seqs, rows):
        n = len(s.block_table)
        assert builder.blocks.table[row, :n].tolist() == s.block_table
    builder.release(1)
    builder.release(1)  # (twice, or an unknown id: ignored)
    assert 1 not in builder.blocks.rows and len(builder.blocks.free_rows) == 8 - 3


def test_attention_metadata_from_step_pads_prefills() -> None:
    g = torch.Generator().manual_seed(SEED + 2)
    batch, _ = _batch(g, {})
    step = StepBuilder(8, 10, BS, torch.device("cpu")).build(batch).step
    meta = AttentionMetadata.from_step(step, BS)
    assert meta.num_decode_tokens == 2 and meta.decode_context_lens.tolist() == [9, 14]
    assert meta.decode_block_tables.shape == (2, 4) and meta.prefill_block_tables.shape == (2, 3)
    # prefills: seq 0 rows 0..7 (positions 3..10), seq 3 rows 8..13 (positions 4..9); max_q = 8
    assert meta.prefill_pad_index.tolist() == [list(range(8)), [8, 9, 10, 11, 12, 13, 13, 13]]
    assert meta.prefill_query_pos.tolist() == [list(range(3, 11)), [4, 5, 6, 7, 8, 9, 9, 9]]
    assert meta.prefill_unpad_index.tolist() == list(range(8)) + list(range(8, 14))
