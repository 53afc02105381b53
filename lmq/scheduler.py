"""Continuous batching: every step, decide which tokens of which sequences to compute.

There is one rule for prefill and decode alike: a sequence has `num_tokens + num_pending -
num_computed` tokens left to compute (its prompt, a recompute after preemption, or the token
just sampled, which with async scheduling may still be on the device: `num_pending`),
and each step spends a token budget on them. Running sequences go first, in arrival order;
then waiting ones are admitted while budget, blocks and `max_num_seqs` allow. A prompt longer
than the remaining budget is computed in chunks over several steps. When blocks run out, the
most recently started running sequence is preempted: its blocks are freed and it recomputes
later (its full blocks may still be in the prefix cache by then). The victim is the sequence
that joined the running list last (a forked sample joins when its request forks).

Adapters: a waiting sequence is admitted only when its adapter holds or can take a device slot
(`AdapterManager.can_activate`); if not, later sequences may go ahead of it. Running sequences
pin their slots, so one step never uses more adapters than there are slots.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmq.block_manager import BlockManager
from lmq.config import SchedulerConfig
from lmq.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from lora.manager import AdapterManager


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    # The BlockManager's live list (not a copy): it only grows while the sequence holds it, and
    # a new table is a new list, which is how lmq.step_builder updates its device rows in place.
    block_table: list[int]
    lora_slot: int = -1  # the adapter's device slot; -1 = the base model

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so this step produces its next token."""
        return self.start + self.num_new_tokens == self.seq.num_tokens + self.seq.num_pending


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    preempted: list[Sequence] = field(default_factory=list)
    lora_rank: int = 0  # the largest adapter rank among the scheduled sequences; 0 = no adapter

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 adapters: AdapterManager | None = None) -> None:
        self.config = config
        self.blocks = block_manager
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample: its blocks were shared by `BlockManager.fork`; its adapter's slot is
        already pinned by the sample it forked from."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if seq.adapter is not None:
            self.adapters.activate(seq.seq_id, seq.adapter)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        if self.adapters is not None:
            self.adapters.deactivate(seq.seq_id)

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        queue = deque(self.running)
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_tokens + seq.num_pending - seq.num_computed_tokens, budget)
            if n == 0:  # async scheduling: its last token is in flight and ends it (by length)
                continue
            while not self.blocks.can_allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(self._grant(seq, n))
                budget -= n
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
        rank = max((s.seq.adapter.rank for s in scheduled if s.seq.adapter is not None), default=0)
        return ScheduledBatch(scheduled, preempted, rank)

    def _admit_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        # A request of n samples forks into n running sequences once its prompt is in: count
        # the forks still to come of running requests and of the one being admitted.
        pending = sum(s.params.n - 1 for s in self.running if s.request.needs_fork)
        i = 0
        while i < len(self.waiting) and budget > 0:
            seq = self.waiting[i]
            width = seq.params.n if seq.request.needs_fork else 1
            if len(self.running) + pending + width > self.config.max_num_seqs:
                break
            if seq.num_pending:  # preempted with a token still in flight: admitted once it is known
                i += 1
                continue
            if seq.adapter is not None and not self.adapters.can_activate(seq.adapter):
                i += 1  # its adapter has no free slot or is still being read: others go first
                continue
            cached: list[int] = []
            if seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None:
                cached = self.blocks.find_cached_prefix(seq.key_token_ids, seq.cache_key)
            num_cached = len(cached) * self.blocks.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if not self.blocks.can_allocate(seq.seq_id, num_cached + n, cached):
                break
            pending += width - 1
            del self.waiting[i]
            self.blocks.record_prefix_lookup(seq.num_tokens, num_cached)
            self.blocks.allocate(seq.seq_id, num_cached + n, cached)
            seq.num_computed_tokens = num_cached
            if seq.num_tokens == seq.num_prompt_tokens:  # first admission, not a re-admission after preemption
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            slot = self.adapters.activate(seq.seq_id, seq.adapter) if seq.adapter is not None else -1
            scheduled.append(ScheduledSeq(seq, num_cached, n, self.blocks.block_table(seq.seq_id), slot))
            budget -= n
        return budget

    def _grant(self, seq: Sequence, n: int) -> ScheduledSeq:
        self.blocks.allocate(seq.seq_id, seq.num_computed_tokens + n)
        slot = self.adapters.pinned_slot(seq.seq_id) if self.adapters is not None else -1
        return ScheduledSeq(seq, seq.num_computed_tokens, n, self.blocks.block_table(seq.seq_id), slot)

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the KV, keep the tokens, go back to the waiting front."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        if self.adapters is not None:
            self.adapters.deactivate(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def on_step_done(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and register newly full blocks in the prefix cache (only
        blocks of known tokens: a block holding a pending token is registered a step later)."""
        for s in batch.seqs:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
            self.cache_computed(s.seq)

    def cache_computed(self, seq: Sequence) -> None:
        """Register the sequence's full blocks of computed, known tokens in the prefix cache."""
        if seq.seq_id in self.blocks.tables:
            known = min(seq.num_computed_tokens, seq.num_tokens)
            self.blocks.cache_full_blocks(seq.seq_id, seq.key_token_ids, known, seq.cache_key)
