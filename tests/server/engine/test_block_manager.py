"""BlockManager: allocation, reference counts, prefix-cache hits, LRU eviction, collision safety."""

import pytest

import server.engine.block_manager as block_manager_module
from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence

BS = 4  # small blocks keep the arithmetic in the tests readable


def make_seq(tokens: list[int], seq_id: int = 0, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, f"req-{seq_id}", tokens, max_tokens, arrival_time=float(seq_id))


def admit_and_compute(bm: BlockManager, seq: Sequence, chunk: int | None = None) -> None:
    """Admit seq and compute all its tokens in chunks, as the scheduler and model would."""
    bm.allocate_prompt(seq)
    while seq.num_computed_tokens < seq.num_tokens:
        n = min(chunk or seq.num_tokens, seq.num_tokens - seq.num_computed_tokens)
        bm.append_slots(seq, n)
        seq.num_computed_tokens += n
        bm.commit_computed(seq)
    bm.check_invariants()


def test_fresh_manager_is_all_free() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    assert (bm.num_free_blocks, bm.num_total_blocks, bm.usage) == (10, 10, 0.0)
    bm.check_invariants()


@pytest.mark.parametrize("chunks", [[9], [1] * 9, [4, 4, 1], [3, 5, 1], [8, 1]])
def test_append_slots_covers_exactly_the_computed_span(chunks: list[int]) -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    seq = make_seq(list(range(9)))
    bm.allocate_prompt(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    for n in chunks:
        assert bm.can_append_slots(seq, n)
        bm.append_slots(seq, n)
        seq.num_computed_tokens += n
        assert len(seq.block_table) == -(-seq.num_computed_tokens // BS)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)


def test_can_append_slots_refuses_beyond_free_blocks() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(12)))
    bm.allocate_prompt(seq)
    assert bm.can_append_slots(seq, 8)
    assert not bm.can_append_slots(seq, 9)
    with pytest.raises(AssertionError, match="needs 3 blocks"):
        bm.append_slots(seq, 9)


def test_prefix_hit_references_shared_blocks_and_counts_tokens() -> None:
    bm = BlockManager(num_blocks=20, block_size=16)
    prefix = list(range(100, 164))
    first = make_seq([*prefix, 1, 2, 3], seq_id=0)
    admit_and_compute(bm, first, chunk=20)
    second = make_seq([*prefix, 7, 8], seq_id=1)
    assert bm.can_allocate(second)
    bm.allocate_prompt(second)
    assert second.num_cached_tokens == second.num_computed_tokens == 64
    assert second.block_table == first.block_table[:4]
    assert [bm.ref_count(b) for b in first.block_table] == [2, 2, 2, 2, 1]
    assert bm.num_prefix_queries_tokens == 67 + 66
    assert bm.num_prefix_hit_tokens == 64


@pytest.mark.parametrize(("length", "expected_hit"), [(64, 48), (65, 64), (63, 48), (17, 16), (16, 0)])
def test_full_match_still_leaves_the_last_token_to_compute(length: int, expected_hit: int) -> None:
    bm = BlockManager(num_blocks=20, block_size=16)
    tokens = list(range(length))
    admit_and_compute(bm, make_seq(tokens, seq_id=0))
    again = make_seq(tokens, seq_id=1)
    bm.allocate_prompt(again)
    assert again.num_cached_tokens == expected_hit
    assert again.num_computed_tokens < again.num_tokens


def test_only_full_computed_blocks_are_registered() -> None:
    bm = BlockManager(num_blocks=20, block_size=BS)
    tokens = list(range(11))
    seq = make_seq(tokens, seq_id=0)
    bm.allocate_prompt(seq)
    bm.append_slots(seq, 7)  # slots for 7 tokens, one full block computed
    seq.num_computed_tokens = 7
    bm.commit_computed(seq)
    assert bm.num_cached_blocks == 1
    other = make_seq(tokens, seq_id=1)
    bm.allocate_prompt(other)
    assert other.num_cached_tokens == 4  # not 8: the second block's KV is not all written


def test_identical_prompts_share_blocks() -> None:
    bm = BlockManager(num_blocks=20, block_size=16)
    prompt = list(range(49))  # three full blocks and one token
    first = make_seq(prompt, seq_id=0)
    admit_and_compute(bm, first)
    twins = [make_seq(prompt, seq_id=i) for i in range(1, 5)]
    for seq in twins:
        bm.allocate_prompt(seq)
        bm.append_slots(seq, 1)
    shared = first.block_table[:3]
    assert all(seq.block_table[:3] == shared for seq in twins)
    assert [bm.ref_count(b) for b in shared] == [5, 5, 5]
    # Each twin computes its last token in a private block.
    tails = {seq.block_table[3] for seq in twins} | {first.block_table[3]}
    assert len(tails) == 5 and all(bm.ref_count(b) == 1 for b in tails)
    for seq in [first, *twins]:
        bm.free(seq)
    assert [bm.ref_count(b) for b in shared] == [0, 0, 0]
    assert bm.num_free_blocks == bm.num_total_blocks
    bm.check_invariants()


def test_concurrent_duplicate_content_keeps_the_first_mapping() -> None:
    bm = BlockManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    a, b = make_seq(prompt, seq_id=0), make_seq(prompt, seq_id=1)
    bm.allocate_prompt(a)
    bm.allocate_prompt(b)  # admitted in the same step: nothing to hit yet
    for seq in (a, b):
        bm.append_slots(seq, 9)
        seq.num_computed_tokens = 9
        bm.commit_computed(seq)
    assert bm.num_cached_blocks == 2
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(b)
    bm.check_invariants()
    c = make_seq(prompt, seq_id=2)
    bm.allocate_prompt(c)
    assert c.block_table == a_blocks[:2] and not set(c.block_table) & set(b_blocks)
    bm.free(a)
    bm.free(c)
    assert bm.num_free_blocks == bm.num_total_blocks
    bm.check_invariants()


def test_free_resets_the_sequence_and_keeps_content_cached() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    seq = make_seq(list(range(9)))
    admit_and_compute(bm, seq)
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    assert bm.num_cached_blocks == 2  # free, yet still reusable
    bm.check_invariants()


def test_eviction_is_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a_tokens, b_tokens = list(range(9)), list(range(100, 109))
    a = make_seq(a_tokens, seq_id=0)
    admit_and_compute(bm, a)
    bm.free(a)
    b = make_seq(b_tokens, seq_id=1)
    admit_and_compute(bm, b)
    bm.free(b)
    # Touch A's content again: it becomes more recently freed than B's.
    a2 = make_seq(a_tokens, seq_id=2)
    bm.allocate_prompt(a2)
    assert a2.num_cached_tokens == 8
    bm.free(a2)
    assert bm.num_cached_blocks == 4
    # Needs 4 blocks: the 2 never-hashed ones go first, then exactly B's 2 cached blocks.
    big = make_seq(list(range(500, 516)), seq_id=3)
    bm.allocate_prompt(big)
    bm.append_slots(big, 16)
    bm.check_invariants()
    assert bm.num_cached_blocks == 2
    probe_a, probe_b = make_seq(a_tokens, seq_id=4), make_seq(b_tokens, seq_id=5)
    assert bm._match_prefix(probe_a) != [] and bm._match_prefix(probe_b) == []
    bm.allocate_prompt(probe_a)
    assert probe_a.num_cached_tokens == 8


def test_tail_blocks_are_evicted_before_the_head() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    tokens = list(range(13))  # three full blocks
    seq = make_seq(tokens, seq_id=0)
    admit_and_compute(bm, seq)
    bm.free(seq)
    other = make_seq(list(range(100, 108)), seq_id=1)
    bm.allocate_prompt(other)
    bm.append_slots(other, 8)  # one unhashed block, then one eviction: the chain's tail
    again = make_seq(tokens, seq_id=2)
    bm.allocate_prompt(again)
    assert again.num_cached_tokens == 8


def test_referenced_blocks_are_never_evicted() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    holder = make_seq(list(range(9)), seq_id=0)
    admit_and_compute(bm, holder)  # holds 3 blocks, 2 of them cached
    newcomer = make_seq(list(range(100, 108)), seq_id=1)
    bm.allocate_prompt(newcomer)
    assert bm.can_append_slots(newcomer, 4) and not bm.can_append_slots(newcomer, 5)
    bm.append_slots(newcomer, 4)
    assert bm.num_free_blocks == 0 and bm.num_cached_blocks == 2
    assert not set(newcomer.block_table) & set(holder.block_table)


def test_can_allocate_counts_revived_cached_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    first = make_seq(list(range(9)), seq_id=0)
    admit_and_compute(bm, first)
    bm.free(first)  # 3 free: 2 cached + 1 unhashed
    longer = make_seq([*range(8), 50, 51, 52, 53, 54], seq_id=1)  # 13 tokens, 8 cached
    # Everything: revive 2 + 2 new blocks > 3 free. One chunk of 4: revive 2 + 1 new fits.
    assert not bm.can_allocate(longer)
    assert bm.can_allocate(longer, max_new_tokens=4)
    bm.allocate_prompt(longer)
    assert longer.num_computed_tokens == 8 and bm.num_free_blocks == 1
    bm.append_slots(longer, 4)
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_hash_collision_never_reuses_other_content(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager_module, "compute_block_hash", lambda prev, tokens: 0)
    bm = BlockManager(num_blocks=20, block_size=BS)
    a_tokens = list(range(9))
    admit_and_compute(bm, make_seq(a_tokens, seq_id=0))
    b = make_seq(list(range(100, 109)), seq_id=1)
    bm.allocate_prompt(b)
    assert b.num_cached_tokens == 0 and b.block_table == []
    bm.append_slots(b, 9)
    b.num_computed_tokens = 9
    bm.commit_computed(b)  # its key is taken: it must not overwrite A's entry
    c = make_seq(a_tokens, seq_id=2)
    bm.allocate_prompt(c)
    assert c.num_cached_tokens == 4  # A's first block; its second shares key 0 and is not cached
    bm.check_invariants()


def test_collision_in_the_parent_chain_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash that ignores the previous block: equal blocks after different prefixes collide.
    monkeypatch.setattr(block_manager_module, "compute_block_hash", lambda prev, tokens: hash(tokens))
    bm = BlockManager(num_blocks=20, block_size=BS)
    w, x, y = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    admit_and_compute(bm, make_seq([*w, *y, 9], seq_id=0))  # caches W, then Y after W
    admit_and_compute(bm, make_seq([*x, 9], seq_id=1))  # caches X
    probe = make_seq([*x, *y, 9], seq_id=2)
    bm.allocate_prompt(probe)
    # X matches; the cached Y block holds KV computed after W, not after X.
    assert probe.num_cached_tokens == 4


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(13))
    admit_and_compute(bm, make_seq(tokens, seq_id=0))
    again = make_seq(tokens, seq_id=1)
    bm.allocate_prompt(again)
    assert again.num_cached_tokens == 0 and bm.num_cached_blocks == 0
    assert bm.num_prefix_queries_tokens == bm.num_prefix_hit_tokens == 0


def test_resumed_sequence_hits_its_own_generated_blocks() -> None:
    bm = BlockManager(num_blocks=20, block_size=BS)
    seq = make_seq(list(range(6)), seq_id=0)
    admit_and_compute(bm, seq)
    for token in (40, 41, 42):  # decode steps
        seq.append_token(token)
        bm.append_slots(seq, 1)
        seq.num_computed_tokens += 1
        bm.commit_computed(seq)
    seq.append_token(43)
    bm.free(seq)  # preempted: 10 tokens, 8 of them in two full cached blocks
    bm.allocate_prompt(seq)
    assert seq.num_computed_tokens == 8
