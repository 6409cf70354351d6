"""The decode graph runner's static-buffer path, run eagerly on CPU: padded == unpadded, padding touches only the
scratch block, buffers rebuilt step after step, and no host sync in the forward."""

import random

import pytest
import torch

from model import AttentionMetadata, CustomLLM, PagedLatentCache
from server.engine.cuda_graphs import DecodeGraphRunner, capture_sizes
from tests.model.conftest import TINY, random_model

BS = 4  # tokens per block
NUM_BLOCKS = 40  # usable blocks; block NUM_BLOCKS is the scratch block
MAX_BLOCKS = 8  # block-table width: contexts up to 32 tokens
MAX_SEQS = 8


@pytest.fixture(scope="module")
def model() -> CustomLLM:
    return random_model(TINY, 3)


def random_cache(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cache = PagedLatentCache(TINY, NUM_BLOCKS + 1, BS, torch.float32)
    for layer in cache.layers:
        layer.copy_(torch.randn(layer.shape, generator=g))
    return cache.layers


def make_runner(model: CustomLLM, caches: list[torch.Tensor]) -> DecodeGraphRunner:
    return DecodeGraphRunner(model, caches, max_num_seqs=MAX_SEQS, max_blocks_per_seq=MAX_BLOCKS, block_size=BS,
                             scratch_block=NUM_BLOCKS, use_cuda_graphs=False)


def random_step(rng: random.Random, b: int) -> tuple[list[int], list[int], list[list[int]]]:
    """b decode sequences: ids, context lengths (1..32) and disjoint, shuffled block tables."""
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    ids, lens, tables = [], [], []
    for _ in range(b):
        n = rng.randint(1, MAX_BLOCKS * BS)
        ids.append(rng.randrange(1, TINY.vocab_size))
        lens.append(n)
        tables.append([free.pop() for _ in range(-(-n // BS))])
    return ids, lens, tables


def eager(model: CustomLLM, caches: list[torch.Tensor], ids, lens, tables,
          routed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ordinary unpadded decode step: hidden states [b, D] and expert counts (and, given routed [b, L, K], the
    routed experts)."""
    meta = AttentionMetadata.build([1] * len(ids), lens, tables, BS)
    counts = torch.zeros(TINY.num_hidden_layers, TINY.num_routed_experts, dtype=torch.int64)
    hidden = model(torch.tensor(ids), torch.tensor([n - 1 for n in lens]), meta, caches, counts, routed)
    return hidden, counts


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # bitwise comparison, NaN included


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("b", [1, 3, 5, 8])
def test_padded_equals_unpadded(model: CustomLLM, b: int) -> None:
    ids, lens, tables = random_step(random.Random(b), b)
    ref_caches, caches = random_cache(0), random_cache(0)
    want, want_counts = eager(model, ref_caches, ids, lens, tables)
    runner = make_runner(model, caches)
    assert runner.bucket_for(b) >= b
    got, counts, _ = runner.run(ids, [n - 1 for n in lens], lens, tables)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == want_counts.tolist()  # the padding rows' routing is subtracted
    # Both wrote the same new entries; the runner also wrote the scratch block (when it padded).
    for ref, layer in zip(ref_caches, caches, strict=True):
        torch.testing.assert_close(layer[:NUM_BLOCKS], ref[:NUM_BLOCKS], atol=1e-5, rtol=1e-5)


def test_padding_touches_only_the_scratch_block(model: CustomLLM) -> None:
    """Every block the step does not own is NaN: the output stays exact and those blocks keep their bits."""
    ids, lens, tables = random_step(random.Random(7), 3)  # bucket 4: one padding row
    clean = random_cache(1)
    want, _ = eager(model, [c.clone() for c in clean], ids, lens, tables)
    owned = sorted({blk for t in tables for blk in t})
    poisoned = [torch.full_like(c, float("nan")) for c in clean]
    for p, c in zip(poisoned, clean, strict=True):
        p[owned] = c[owned]
        # The scratch block holds finite garbage: the torch path multiplies masked entries by 0 (NaN would spread)
        p[NUM_BLOCKS] = 1e4
    before = [p.clone() for p in poisoned]
    got, _, _ = make_runner(model, poisoned).run(ids, [n - 1 for n in lens], lens, tables)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    others = [blk for blk in range(NUM_BLOCKS) if blk not in owned]
    new_slots = {(t[(n - 1) // BS], (n - 1) % BS) for t, n in zip(tables, lens, strict=True)}
    for p, old in zip(poisoned, before, strict=True):
        assert torch.equal(bits(p[others]), bits(old[others]))  # nobody wrote outside its own blocks
        changed = {(blk, i) for blk in owned for i in range(BS) if not torch.equal(bits(p[blk, i]), bits(old[blk, i]))}
        assert changed <= new_slots  # the owned blocks changed only at the new tokens' slots
        assert not torch.equal(bits(p[NUM_BLOCKS, 0]), bits(old[NUM_BLOCKS, 0]))  # padding wrote its slot ...
        assert torch.equal(bits(p[NUM_BLOCKS, 1:]), bits(old[NUM_BLOCKS, 1:]))  # ... and only that one


def test_buffers_rebuilt_step_after_step(model: CustomLLM) -> None:
    """Batch sizes go up and down across buckets (stale rows of a bigger step must not leak into a smaller one)."""
    rng = random.Random(11)
    ref_caches, caches = random_cache(2), random_cache(2)
    runner = make_runner(model, caches)
    for b in [5, 3, 8, 1, 2, 7, 4, 1]:
        ids, lens, tables = random_step(rng, b)
        want, want_counts = eager(model, ref_caches, ids, lens, tables)
        got, counts, _ = runner.run(ids, [n - 1 for n in lens], lens, tables)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step of {b}")
        assert counts.tolist() == want_counts.tolist()
    for ref, layer in zip(ref_caches, caches, strict=True):
        torch.testing.assert_close(layer[:NUM_BLOCKS], ref[:NUM_BLOCKS], atol=1e-5, rtol=1e-5)


def test_routed_experts_of_the_real_rows_between_steps_that_do_not_record(model: CustomLLM) -> None:
    """Recording and plain steps alternate over buckets: each recording step returns exactly the unpadded step's
    routed experts of its b rows; a plain one returns none and the same hidden states."""
    rng = random.Random(13)
    ref_caches, caches = random_cache(5), random_cache(5)
    runner = make_runner(model, caches)
    for b, record in [(5, True), (3, False), (4, True), (1, True), (2, False), (6, True)]:
        ids, lens, tables = random_step(rng, b)
        want_routed = torch.full((b, TINY.num_hidden_layers, TINY.top_k_experts), -1, dtype=torch.int32)
        want, _ = eager(model, ref_caches, ids, lens, tables, want_routed)
        got, _, routed = runner.run(ids, [n - 1 for n in lens], lens, tables, record)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step of {b}")
        if record:
            assert routed is not None and torch.equal(routed, want_routed), f"step of {b}"
            assert int(routed.min()) >= 0 and int(routed.max()) < TINY.num_routed_experts
        else:
            assert routed is None


def test_rejects_what_it_cannot_hold(model: CustomLLM) -> None:
    runner = make_runner(model, random_cache(3))
    assert runner.can_run(MAX_SEQS, [[0]] * MAX_SEQS)
    assert not runner.can_run(MAX_SEQS + 1, [[0]] * (MAX_SEQS + 1))
    assert not runner.can_run(1, [list(range(MAX_BLOCKS + 1))])


def test_engine_through_the_static_decode_path_generates_the_same_tokens() -> None:
    """Greedy and seeded requests of ragged lengths, batched: the same tokens with and without the runner."""
    from server.engine.sampling_params import SamplingParams
    from tests.server.engine_utils import make_engine, run_all

    rng = random.Random(5)
    reqs = [([rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(1, 30))],
             SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=6 + i, ignore_eos=True))
            for i in range(7)]
    outputs = []
    for static in (False, True):
        e = make_engine(num_blocks=96, max_num_seqs=8, max_model_len=64, static_decode=static)
        e.start()
        try:
            outputs.append(run_all(e, reqs))
            runner = e.runner.decode_runner
            assert (runner is not None) == static
            if runner is not None:
                assert len(runner._pad_counts) >= 2  # several buckets were used as the batch drained
        finally:
            e.shutdown()
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("record_routed", [False, True])
def test_no_host_sync_in_the_decode_forward(record_routed: bool) -> None:
    """torch.compile(fullgraph=True) over the static decode forward fails on any host sync or data-dependent shape.

    With the graph-safe backends CUDA uses (masked-dense experts: the grouped GEMM's tracing wants bf16; the torch
    decode attention: the CPU kernel is an opaque extension op)."""
    m = random_model(TINY, 3, attention="torch", moe="dense-masked")
    ids, lens, tables = random_step(random.Random(3), 3)
    want, _ = eager(m, random_cache(4), ids, lens, tables)
    runner = make_runner(m, random_cache(4))
    bucket = runner.bucket_for(3)
    runner._fill_host(ids, [n - 1 for n in lens], lens, tables, 3, bucket)
    runner._device.copy_(runner._host)
    torch._dynamo.reset()
    got = torch.compile(runner._forward, fullgraph=True, backend="eager")(bucket, record_routed)
    torch.testing.assert_close(got[:3], want, atol=1e-5, rtol=1e-5)
