"""Blocked KV cache bookkeeping: which physical blocks each sequence owns. Pure Python, no torch.

A sequence's block table maps its token positions to physical blocks:

    position p  ->  block table[p // block_size], slot p % block_size

Prefix caching: once a block is full and computed, it gets a key chained from the previous
block's hash, its tokens and an extra key (the adapter's id), so equal prefixes map to
equal keys. A new sequence whose leading full blocks match cached keys reuses those blocks
instead of recomputing them.

Invariants (`check_integrity`):
  * every block is either in the free queue (ref_count == 0) or referenced (ref_count > 0);
  * a block's ref_count equals the number of block tables holding it;
  * every entry of the cache map points at a block whose key is that entry's key;
  * a sequence's table is one list object that only grows (appends) while the sequence holds
    it; `free` drops it and a later `allocate` / `fork` makes a new list (lmq.step_builder
    relies on this to update its device copy of the table incrementally);
  * the free queue is in LRU order: a free block that still holds cached content is evicted
    (its key dropped) only when it is handed out again, the least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockKey = tuple[int, tuple[int, ...], object]  # (parent hash, tokens of the block, extra key)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and registered in the prefix cache


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` positions (ceiling division)."""
    return -(-num_tokens // block_size)


def _key(parent_hash: int, tokens: list[int], extra: object) -> BlockKey:
    return (parent_hash, tuple(tokens), extra)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cache: dict[BlockKey, int] = {}
        self.tables: dict[int, list[int]] = {}
        self.chain: dict[int, list[int]] = {}  # seq -> hash of each of its registered full blocks
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def block_table(self, seq_id: int) -> list[int]:
        return self.tables.get(seq_id, [])

    def blocks_needed(self, num_slots: int) -> int:
        return blocks_for(num_slots, self.block_size)

    def find_cached_prefix(self, token_ids: list[int], extra: object = None) -> list[int]:
        """Blocks holding the longest cached run of full leading blocks of `token_ids`. At least
        one token is always left uncached so the caller computes logits for the last one."""
        if not self.enable_prefix_caching:
            return []
        bs, parent, found = self.block_size, 0, []
        for i in range((len(token_ids) - 1) // bs):
            key = _key(parent, token_ids[i * bs:(i + 1) * bs], extra)
            block_id = self.cache.get(key)
            if block_id is None:
                break
            found.append(block_id)
            parent = hash(key)
        return found

    def can_allocate(self, seq_id: int, num_slots: int, cached: list[int] = ()) -> bool:
        """Whether the sequence's table can grow to cover `num_slots` positions."""
        have = len(self.tables.get(seq_id, ())) + len(cached)
        if not cached and have * self.block_size >= num_slots:
            return True  # the common decode step: the last block still has room
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # these leave the free queue too
        return self.blocks_needed(num_slots) - have <= self.num_free_blocks - revived

    # -- mutations -----------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_slots: int, cached: list[int] = (), extra: object = None) -> None:
        """Grow the sequence's table to cover `num_slots` positions. `cached` (first call only)
        are prefix-cache hits from `find_cached_prefix`, which lead the table."""
        if not self.can_allocate(seq_id, num_slots, cached):
            raise RuntimeError(f"out of KV blocks: seq {seq_id} needs {num_slots} slots")
        table = self.tables.setdefault(seq_id, [])
        if cached:
            assert not table, "cached prefix blocks only lead a new table"
            parent = 0
            for b in cached:
                self._take(b)
                table.append(b)
                parent = hash(self.blocks[b].key)
                self.chain.setdefault(seq_id, []).append(parent)
        while len(table) < self.blocks_needed(num_slots):
            block_id, _ = self.free_queue.popitem(last=False)  # least recently freed
            self._evict(block_id)
            self.blocks[block_id].ref_count = 1
            table.append(block_id)

    def record_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed: int, extra: object = None) -> None:
        """Register the sequence's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs, chain, table = self.block_size, self.chain.setdefault(seq_id, []), self.tables[seq_id]
        for i in range(len(chain), num_computed // bs):
            key = _key(chain[-1] if chain else 0, token_ids[i * bs:(i + 1) * bs], extra)
            block = self.blocks[table[i]]
            if key not in self.cache and block.key is None:
                block.key = key
                self.cache[key] = block.block_id
            chain.append(hash(key))

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> None:
        """The child shares the parent's blocks that are full within the first `num_tokens`."""
        n = num_tokens // self.block_size
        shared = self.tables[parent_id][:n]
        for b in shared:
            self.blocks[b].ref_count += 1
        self.tables[child_id] = list(shared)
        self.chain[child_id] = list(self.chain.get(parent_id, [])[:n])

    def free(self, seq_id: int) -> None:
        """Drop the sequence's table. Its blocks keep their cached content until evicted; the
        tail goes to the queue first so that, among them, the tail is evicted first."""
        for b in reversed(self.tables.pop(seq_id, [])):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[b] = None
        self.chain.pop(seq_id, None)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.key is not None:
            if self.cache.get(block.key) == block_id:
                del self.cache[block.key]
            block.key = None

    # -- checks --------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        refs = [0] * self.num_blocks
        for table in self.tables.values():
            for b in table:
                refs[b] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref_count mismatch"
            in_free = block.block_id in self.free_queue
            assert in_free == (block.ref_count == 0), f"block {block.block_id}: free queue mismatch"
        for key, b in self.cache.items():
            assert self.blocks[b].key == key, f"block {b}: cache map mismatch"
