"""Paged KV-cache blocks: allocation, reference counts and automatic prefix caching.

A FULL block whose KV has been computed is registered under a hash chained over its token
ids and the previous block's hash, so a later sequence with the same prefix can reference
it instead of recomputing it. Freed registered blocks stay reusable until a new allocation
needs the space; they are then evicted least recently freed first.
"""

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from model.kv_cache import blocks_for
from server.engine.sequence import Sequence

# The parent content id of every sequence's first block.
_ROOT_CONTENT_ID = 0


def compute_block_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block's tokens chained over the previous block's hash."""
    # hash() of a tuple of ints is deterministic across processes (no str randomisation involved).
    return hash((prev_hash, token_ids))


@dataclass(slots=True)
class Block:
    """One cache block: its reference count and, while registered, the content it holds."""

    block_id: int
    ref_count: int = 0
    # The fields below are set while the block is in the prefix cache and cleared on eviction.
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    # Unique per registration and never reused, so a child can name its exact parent content
    # even after the parent's block id has been recycled for something else.
    content_id: int = _ROOT_CONTENT_ID
    parent_content_id: int = _ROOT_CONTENT_ID


@dataclass(slots=True)
class _PrefixChain:
    """(hash, content_id) of a sequence's leading blocks whose content is known to the cache."""

    links: list[tuple[int, int]] = field(default_factory=list)
    # Set after a true hash collision: later blocks cannot be keyed, so they stay private.
    stopped: bool = False


class BlockManager:
    """Fixed-size cache blocks with reference counts, a free list and a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0, f"num_blocks must be > 0, got {num_blocks}"
        assert block_size > 0, f"block_size must be > 0, got {block_size}"
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks holding nothing reusable: handed out before any cached block.
        self._free_unhashed: deque[int] = deque(range(num_blocks))
        # Unreferenced registered blocks, least recently freed first (the eviction order).
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._chains: dict[int, _PrefixChain] = {}
        self._next_content_id = _ROOT_CONTENT_ID + 1
        # Cumulative, in tokens, for metrics.
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0

    # -- capacity ---------------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        """All blocks of the cache."""
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated: never used, or cached but unreferenced."""
        return len(self._free_unhashed) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence."""
        return 1.0 - self.num_free_blocks / len(self.blocks)

    def ref_count(self, block_id: int) -> int:
        """How many sequences reference the block."""
        return self.blocks[block_id].ref_count

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return blocks_for(num_tokens, self.block_size)

    # -- admission --------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, max_new_tokens: int | None = None) -> bool:
        """Whether seq can be admitted and compute its next min(uncached, max_new_tokens) tokens."""
        matched = self._match_prefix(seq)
        num_matched_tokens = len(matched) * self.block_size
        num_new_tokens = seq.num_tokens - num_matched_tokens
        if max_new_tokens is not None:
            num_new_tokens = min(num_new_tokens, max_new_tokens)
        # Matched blocks nobody references leave the free pool when referenced.
        num_revived = sum(1 for b in matched if self.blocks[b].ref_count == 0)
        num_new_blocks = self.num_blocks_for(num_matched_tokens + num_new_tokens) - len(matched)
        return num_revived + num_new_blocks <= self.num_free_blocks

    def allocate_prompt(self, seq: Sequence) -> None:
        """Admit seq: reference its longest cached prefix and mark those tokens computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0, f"already admitted: {seq}"
        assert seq.seq_id not in self._chains, f"seq_id {seq.seq_id} already holds blocks"
        matched = self._match_prefix(seq)
        for block_id in matched:
            self._reference(block_id)
        seq.block_table = list(matched)
        num_matched_tokens = len(matched) * self.block_size
        seq.num_computed_tokens = num_matched_tokens
        seq.num_cached_tokens = num_matched_tokens
        chain = _PrefixChain()
        for block_id in matched:
            block = self.blocks[block_id]
            assert block.hash is not None
            chain.links.append((block.hash, block.content_id))
        self._chains[seq.seq_id] = chain
        if self.enable_prefix_caching:
            self.num_prefix_queries_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += num_matched_tokens

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest verified cached prefix of seq, leaving its last token out."""
        if not self.enable_prefix_caching or seq.skip_reading_prefix_cache:
            return []
        size = self.block_size
        # The last token is always recomputed: the model needs its logits to sample.
        max_blocks = (seq.num_tokens - 1) // size
        matched: list[int] = []
        prev_hash: int | None = None
        parent = _ROOT_CONTENT_ID
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            block_hash = compute_block_hash(prev_hash, tokens)
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            # Verify content and parent so a hash collision never reuses another prefix's KV.
            if block.token_ids != tokens or block.parent_content_id != parent:
                break
            matched.append(block_id)
            prev_hash, parent = block_hash, block.content_id
        return matched

    # -- per-step slots ---------------------------------------------------------------------

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the table can be grown to cover num_computed_tokens + num_new_tokens."""
        return self._num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover num_computed_tokens + num_new_tokens tokens."""
        assert seq.seq_id in self._chains, f"append_slots before allocate_prompt: {seq}"
        num_missing = self._num_missing_blocks(seq, num_new_tokens)
        assert num_missing <= self.num_free_blocks, (
            f"{seq}: needs {num_missing} blocks, {self.num_free_blocks} free"
        )
        for _ in range(num_missing):
            block_id = self._pop_free()
            self.blocks[block_id].ref_count = 1
            seq.block_table.append(block_id)

    def commit_computed(self, seq: Sequence) -> None:
        """Register seq's full blocks whose KV is now written, so later sequences can hit them."""
        if not self.enable_prefix_caching:
            return
        chain = self._chains[seq.seq_id]
        if chain.stopped:
            return
        size = self.block_size
        for i in range(len(chain.links), seq.num_computed_tokens // size):
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            prev_hash, parent = chain.links[-1] if chain.links else (None, _ROOT_CONTENT_ID)
            block_hash = compute_block_hash(prev_hash, tokens)
            existing_id = self._hash_to_block.get(block_hash)
            if existing_id is None:
                block = self.blocks[seq.block_table[i]]
                assert block.hash is None, f"block {block.block_id} registered twice"
                block.hash, block.token_ids = block_hash, tokens
                block.content_id, block.parent_content_id = self._next_content_id, parent
                self._next_content_id += 1
                self._hash_to_block[block_hash] = block.block_id
                chain.links.append((block_hash, block.content_id))
                continue
            existing = self.blocks[existing_id]
            if existing.token_ids == tokens and existing.parent_content_id == parent:
                # Same content computed concurrently: keep the existing entry, ours stays private.
                chain.links.append((block_hash, existing.content_id))
            else:
                # A true collision: the key is taken by other content, never overwrite it.
                chain.stopped = True
                return

    # -- release ----------------------------------------------------------------------------

    def release_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Drop the blocks of seq's table past those holding its first num_tokens tokens (blocks that only rejected
        speculative drafts needed: never registered, since no computed token fills them)."""
        keep = self.num_blocks_for(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.hash is None, f"tail block {block} of {seq} is shared or cached"
            block.ref_count = 0
            self._free_unhashed.append(block_id)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its table is cleared and num_computed_tokens reset to 0."""
        # Tail first, so under pressure a chain's tail is evicted before its shareable head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} of {seq} has ref_count 0"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_unhashed.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._chains.pop(seq.seq_id, None)

    def _reference(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            # An unreferenced cached block sits in the LRU; referencing protects it from eviction.
            del self._free_cached[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free_unhashed:
            return self._free_unhashed.popleft()
        block_id, _ = self._free_cached.popitem(last=False)
        block = self.blocks[block_id]
        assert block.hash is not None and self._hash_to_block[block.hash] == block_id
        del self._hash_to_block[block.hash]
        block.hash, block.token_ids = None, None
        block.content_id = block.parent_content_id = _ROOT_CONTENT_ID
        return block_id

    def check_invariants(self) -> None:
        """Assert the free pools, reference counts and hash map agree (for tests and debugging)."""
        unhashed, cached = set(self._free_unhashed), set(self._free_cached)
        assert len(unhashed) == len(self._free_unhashed), "duplicate in the unhashed free list"
        assert not unhashed & cached, f"blocks in both free pools: {unhashed & cached}"
        for block in self.blocks:
            free = block.block_id in unhashed or block.block_id in cached
            assert free == (block.ref_count == 0), f"{block}: free={free}"
            assert block.block_id not in cached or block.hash is not None, f"{block} unhashed in LRU"
            assert block.block_id not in unhashed or block.hash is None, f"{block} hashed, unhashed pool"
        for block_hash, block_id in self._hash_to_block.items():
            assert self.blocks[block_id].hash == block_hash, f"hash map points at {self.blocks[block_id]}"
