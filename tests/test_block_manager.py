"""BlockManager and Scheduler without a model: a simulated engine loop over a fake KV cache that
checks every computed position holds the right token prefix (stale or overwritten blocks fail)."""

from __future__ import annotations

import itertools
import random

import pytest

from conftest import SEED
from lmq.block_manager import BlockManager
from lmq.config import SchedulerConfig
from lmq.sampling import SamplingParams
from lmq.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from lmq.sequence import Request, Sequence, SequenceStatus


class Sim:
    """Drives a Scheduler the way LLMEngine.step does (fork, append, finish, remove)."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int = 8, budget: int = 64,
                 caching: bool = True, rng: random.Random | None = None) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), self.bm)
        self.rng = rng or random.Random(0)
        self.ids = itertools.count()
        self.kv: dict[tuple[int, int], int] = {}  # (block, slot) -> hash of the token prefix ending there
        self.requests: list[Request] = []
        self.sampled: list[Sequence] = []  # last step's sequences that produced a token

    def add(self, prompt: list[int], max_tokens: int = 4, n: int = 1, **kw: object) -> Sequence:
        req = Request(f"r{len(self.requests)}", None, list(prompt), SamplingParams(n=n, max_tokens=max_tokens, **kw))
        self.requests.append(req)
        seq = self._new_seq(req)
        self.sched.add(seq)
        return seq

    def _new_seq(self, req: Request) -> Sequence:
        seq = Sequence(next(self.ids), req, len(req.seqs), list(req.prompt_token_ids), len(req.prompt_token_ids))
        req.seqs.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        for s in seq.request.seqs:
            if not s.is_finished:
                s.finish("abort")
                self.sched.remove(s)

    def step(self) -> ScheduledBatch:
        batch = self.sched.schedule()
        assert batch.num_tokens <= self.sched.config.max_num_batched_tokens
        assert len({s.seq.seq_id for s in batch.seqs}) == len(batch.seqs)
        assert not {s.seq.seq_id for s in batch.seqs} & {s.seq_id for s in batch.preempted}
        for s in batch.seqs:
            self._compute(s)
        self.sched.on_step_done(batch)
        self.sampled = [s.seq for s in batch.seqs if s.samples]  # `samples` is live: read before appending
        for seq in self.sampled:
            family = [seq]
            if seq.request.needs_fork:  # as LLMEngine._expand_forks
                for _ in range(1, seq.params.n):
                    child = self._new_seq(seq.request)
                    self.bm.fork(seq.seq_id, child.seq_id, child.num_tokens)
                    child.num_computed_tokens = len(self.bm.block_table(child.seq_id)) * self.bm.block_size
                    self.sched.add_running(child)
                    family.append(child)
            for s in family:
                s.token_ids.append(self.rng.randrange(50))
                if len(s.output_token_ids) >= s.params.max_tokens:
                    s.finish("length")
                    self.sched.remove(s)
        self.bm.check_integrity()
        return batch

    def _compute(self, s: ScheduledSeq) -> None:
        seq, bs, end = s.seq, self.bm.block_size, s.start + s.num_new_tokens
        assert s.start == seq.num_computed_tokens and s.num_new_tokens >= 1 and end <= seq.num_tokens
        assert s.block_table == self.bm.block_table(seq.seq_id) and len(s.block_table) * bs >= end
        h = 0
        for p in range(end):
            h = hash((h, seq.token_ids[p]))
            slot = (block := s.block_table[p // bs], p % bs)
            if p < s.start:
                assert self.kv.get(slot) == h, f"seq {seq.seq_id}: wrong KV at position {p}"
            else:
                assert self.bm.blocks[block].ref_count == 1, f"seq {seq.seq_id} writes shared block {block}"
                self.kv[slot] = h

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                break
            assert not self.step().is_empty, "no progress while work remains"
        assert not self.sched.has_work, "did not finish"

    def assert_no_leak(self) -> None:
        self.bm.check_integrity()
        assert self.bm.num_free_blocks == self.bm.num_blocks and not self.bm.tables and not self.bm.chain


def toks(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


# -- BlockManager -------------------------------------------------------------------------------
def test_allocate_grow_free_no_leak():
    bm = BlockManager(8, 4)
    for seq_id, slots, table_len in [(1, 10, 3), (1, 12, 3), (1, 13, 4), (2, 16, 4)]:
        bm.allocate(seq_id, slots)
        bm.check_integrity()
        assert len(bm.block_table(seq_id)) == table_len
    assert bm.num_free_blocks == 0 and not bm.can_allocate(3, 1) and bm.can_allocate(1, 16)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(3, 1)
    assert set(bm.block_table(1)).isdisjoint(bm.block_table(2))
    for seq_id in (1, 2, 3):
        bm.free(seq_id)
        bm.check_integrity()
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_miss_and_last_token_uncached():
    bm = BlockManager(16, 4)
    t = toks(13)  # 3 full blocks + 1 token
    bm.allocate(1, 13)
    bm.cache_full_blocks(1, t, 13)
    table = bm.block_table(1)
    assert bm.find_cached_prefix(t) == table[:3]
    assert bm.find_cached_prefix(t, extra="adapter") == []  # the extra key is part of the hash
    for k in range(3):  # one token differs in block k: only blocks < k hit
        t2 = list(t)
        t2[4 * k + 1] += 1
        assert bm.find_cached_prefix(t2) == table[:k]
    assert bm.find_cached_prefix(t[:8]) == table[:1]  # exactly 2 full blocks: the last one is recomputed
    assert bm.find_cached_prefix(t[:9]) == table[:2]
    assert bm.find_cached_prefix(t[:4]) == []
    bm.free(1)
    bm.check_integrity()
    assert (cached := bm.find_cached_prefix(t)) == table[:3]  # freed blocks keep their content
    bm.allocate(2, 13, cached)  # revives them out of the free queue
    bm.check_integrity()
    assert bm.block_table(2)[:3] == cached and not set(cached) & set(bm.free_queue)
    bm.free(2)
    assert bm.num_free_blocks == 16


def test_prefix_caching_disabled():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    bm.allocate(1, 9)
    bm.cache_full_blocks(1, toks(9), 9)
    assert bm.find_cached_prefix(toks(9)) == [] and not bm.cache


def test_lru_eviction_and_revival():
    bm = BlockManager(4, 2)
    a = toks(5)
    bm.allocate(1, 4)
    bm.cache_full_blocks(1, a, 4)
    b0, b1 = bm.block_table(1)
    bm.free(1)  # the tail goes first: queue is [never used..., b1, b0]
    assert list(bm.free_queue) == [2, 3, b1, b0]
    bm.allocate(2, 4)  # never-cached blocks are handed out before cached ones
    assert bm.block_table(2) == [2, 3] and bm.find_cached_prefix(a) == [b0, b1]
    bm.allocate(3, 1)  # the least recently freed, b1, is evicted and its key dropped
    assert bm.block_table(3) == [b1] and bm.blocks[b1].key is None
    assert bm.find_cached_prefix(a) == [b0] and len(bm.cache) == 1
    bm.check_integrity()
    assert not bm.can_allocate(4, 3, [b0])  # reviving b0 uses the last free block
    bm.allocate(4, 2, [b0])
    assert bm.blocks[b0].ref_count == 1 and b0 not in bm.free_queue and bm.num_free_blocks == 0
    bm.check_integrity()
    for seq_id in (2, 3, 4):
        bm.free(seq_id)
    bm.check_integrity()
    assert bm.num_free_blocks == 4


def test_fork_shares_full_blocks():
    bm = BlockManager(8, 4)
    t = toks(10)
    bm.allocate(1, 10)
    bm.cache_full_blocks(1, t, 10)
    parent = bm.block_table(1)
    bm.fork(1, 2, 10)
    bm.check_integrity()
    assert bm.block_table(2) == parent[:2] and bm.chain[2] == bm.chain[1][:2]
    assert [bm.blocks[b].ref_count for b in parent] == [2, 2, 1]
    bm.allocate(2, 11)  # the child grows into its own block
    assert bm.block_table(2)[2] not in parent
    bm.free(1)
    bm.check_integrity()
    assert [bm.blocks[b].ref_count for b in parent] == [1, 1, 0]
    bm.free(2)
    bm.check_integrity()
    assert bm.num_free_blocks == 8


# -- Scheduler ----------------------------------------------------------------------------------
def test_chunked_prefill():
    sim = Sim(num_blocks=16, block_size=16, budget=32)
    sim.add(toks(100), max_tokens=3)
    steps = []
    while sim.sched.has_work:
        steps.append([(s.start, s.num_new_tokens, s.seq in sim.sampled) for s in sim.step().seqs])
    assert steps == [[(0, 32, False)], [(32, 32, False)], [(64, 32, False)], [(96, 4, True)],
                     [(100, 1, True)], [(101, 1, True)]]
    sim.assert_no_leak()


def test_running_before_waiting_and_max_num_seqs():
    sim = Sim(num_blocks=32, block_size=4, max_num_seqs=2, budget=32)
    a = sim.add(toks(40, 0))
    assert [(s.seq, s.num_new_tokens) for s in sim.step().seqs] == [(a, 32)]
    b, c = sim.add(toks(40, 100)), sim.add(toks(4, 200))
    assert [(s.seq, s.start, s.num_new_tokens) for s in sim.step().seqs] == [(a, 32, 8), (b, 0, 24)]
    while sim.sched.has_work:
        batch = sim.step()
        assert len(sim.sched.running) <= 2
        if c not in [s.seq for s in batch.seqs]:
            assert c.status is SequenceStatus.WAITING
    assert all(s.finish_reason == "length" for s in (a, b, c))
    sim.assert_no_leak()


def test_prefix_hit_in_scheduler():
    sim = Sim(num_blocks=16, block_size=4)
    p = toks(10)
    sim.add(p, max_tokens=2)
    sim.run()
    b, c = sim.add(p, max_tokens=2), sim.add(p, max_tokens=2, prompt_logprobs=1)
    first = sim.step().seqs
    assert [(s.start, s.num_new_tokens) for s in first] == [(8, 2), (0, 10)]  # no lookup for prompt logprobs
    assert b.num_cached_tokens == 8 and c.num_cached_tokens == 0
    sim.run()
    sim.assert_no_leak()


def test_preemption_by_recompute():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=2)
    a, b, c = sim.add(toks(8, 0), max_tokens=6), sim.add(toks(8, 100), max_tokens=6), sim.add(toks(4, 200), 1)
    assert [s.seq for s in sim.step().seqs] == [a, b]  # 4 blocks in use; c waits on max_num_seqs
    batch = sim.step()  # a needs a 3rd block: b, the latest running, is preempted
    assert batch.preempted == [b] and [s.seq for s in batch.seqs] == [a]
    assert b.num_computed_tokens == 0 and b.status is SequenceStatus.WAITING and not sim.bm.block_table(b.seq_id)
    assert list(sim.sched.waiting) == [b, c] and sim.sched.num_preemptions == 1
    sim.run()
    assert [len(s.output_token_ids) for s in (a, b, c)] == [6, 6, 1]
    sim.assert_no_leak()


def test_fork_respects_max_num_seqs():
    # Admission reserves the slots of running requests that will still fork, not only of the one
    # admitted: a later admission must not overshoot max_num_seqs.
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=2)
    sim.add(toks(6, 0), n=2)
    sim.add(toks(6, 100), n=1)
    sim.step()
    assert len(sim.sched.running) <= 2, f"{len(sim.sched.running)} running, max_num_seqs=2"


def test_num_cached_tokens_counts_prompt_only():
    # Re-admission after preemption must not count the recompute's hits on output tokens as
    # cached prompt tokens (here 4 would exceed a 2-token prompt).
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=2)
    a, b = sim.add(toks(2, 0), max_tokens=14), sim.add(toks(2, 100), max_tokens=14)
    while not sim.step().preempted:
        pass
    sim.abort(a)
    sim.step()  # b comes back with its first block from the prefix cache
    assert b.status is SequenceStatus.RUNNING
    assert b.num_cached_tokens <= b.num_prompt_tokens, f"{b.num_cached_tokens} cached, prompt {b.num_prompt_tokens}"


@pytest.mark.parametrize("seed", [SEED + i for i in range(150)])
def test_stress(seed: int):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    num_blocks, max_num_seqs = rng.randint(2, 24), rng.randint(1, 6)
    sim = Sim(num_blocks, bs, max_num_seqs, budget=rng.randint(1, 64), caching=rng.random() < 0.8, rng=rng)
    max_len = num_blocks * bs
    forks = rng.random() < 0.5  # without forks, max_num_seqs must hold (see test_fork_respects_max_num_seqs)
    bases = [[rng.randrange(50) for _ in range(max_len)] for _ in range(3)]  # shared prefixes

    def arrive() -> None:
        plen = rng.randint(1, max_len - 1)
        shared = rng.randint(0, plen)
        prompt = rng.choice(bases)[:shared] + [rng.randrange(50) for _ in range(plen - shared)]
        sim.add(prompt, max_tokens=rng.randint(1, max_len - plen), n=rng.randint(1, max_num_seqs) if forks else 1)

    try:
        for _ in range(rng.randint(1, 8)):
            arrive()
        for _ in range(20_000):
            if not sim.sched.has_work:
                break
            if len(sim.requests) < 40 and rng.random() < 0.05:
                arrive()
            live = list(sim.sched.running) + list(sim.sched.waiting)
            if live and rng.random() < 0.03:
                sim.abort(rng.choice(live))
            if sim.sched.has_work:
                assert not sim.step().is_empty, "no progress while work remains"
                assert forks or len(sim.sched.running) <= max_num_seqs
        assert not sim.sched.has_work, "did not finish"
        sim.assert_no_leak()
        for req in sim.requests:
            assert all(s.is_finished for s in req.seqs)
            if not any(s.finish_reason == "abort" for s in req.seqs):
                assert req.is_finished and all(len(s.output_token_ids) == req.params.max_tokens for s in req.seqs)
    except AssertionError as e:
        raise AssertionError(f"seed={seed} (LMQ_TEST_SEED={SEED}): {e}") from e
