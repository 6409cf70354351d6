"""Per-token routed experts through the engine on a tiny real model: every row equals the straightforward
reference's routing of the same tokens (float32), after chunked prefill, prefix-cache hits, preemption, through the
static decode path, for each of n samples; and the record keeps one row per position."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from server.engine.engine import Engine
from server.engine.routed_experts import RoutedExpertsRecord
from server.engine.sampling_params import SamplingParams
from server.engine.speculative_config import SpeculativeConfig
from tests.model.conftest import random_state
from tests.model.reference import reference_routing
from tests.server.engine_utils import make_engine, tiny_config

VOCAB = 97
SEED = 1  # make_engine's weights


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(length)]


def asking(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, return_routed_experts=True, **kw)


async def collect(engine: Engine, request_id: str, prompt_ids: list[int],
                  params: SamplingParams) -> dict[int, tuple[list[int], np.ndarray | None]]:
    """Sample index -> (its tokens, its routed-experts rows concatenated over the outputs)."""
    tokens: dict[int, list[int]] = {}
    rows: dict[int, list[np.ndarray]] = {}
    async for batch in engine.add_request(request_id, prompt_ids, params):
        for out in batch:
            tokens.setdefault(out.index, []).extend(out.token_ids)
            if out.routed_experts is not None:
                assert out.token_ids, "rows travel with tokens"
                rows.setdefault(out.index, []).extend(out.routed_experts)
    return {i: (t, np.concatenate(rows[i]) if i in rows else None) for i, t in tokens.items()}


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]],
        ) -> list[dict[int, tuple[list[int], np.ndarray | None]]]:
    async def main() -> list[dict[int, tuple[list[int], np.ndarray | None]]]:
        return await asyncio.gather(*(collect(engine, f"r{i}", p, sp) for i, (p, sp) in enumerate(requests)))
    return asyncio.run(main())


@pytest.fixture(scope="module")
def state():
    return random_state(tiny_config(), SEED)


def assert_reference(state, prompt_ids: list[int], tokens: list[int], rows: np.ndarray | None) -> None:
    """rows are the reference's routing of every token read: the prompt, then each generated token but the last."""
    read = prompt_ids + tokens[:-1]
    assert rows is not None and rows.dtype == np.int32
    assert rows.shape == (len(read), tiny_config().num_hidden_layers, tiny_config().top_k_experts)
    want = reference_routing(state, tiny_config(), read).numpy()
    assert np.array_equal(rows, want), np.argwhere(rows != want)[:5]


@pytest.fixture
def engine(engine):
    """The engine fixture's tiny engines, with --enable-return-routed-experts."""
    return lambda **kwargs: engine(enable_return_routed_experts=True, **kwargs)


def test_rows_equal_the_reference_and_only_askers_get_them(engine, state) -> None:
    e = engine()
    reqs = [(prompt(13, 1), asking(9)), (prompt(7, 2), SamplingParams(temperature=0.0, max_tokens=5)),
            (prompt(1, 3), asking(1)), (prompt(30, 4), asking(12))]
    outs = run(e, reqs)
    assert outs[1][0][1] is None  # did not ask
    for (p, params), out in zip(reqs, outs, strict=True):
        tokens, rows = out[0]
        if params.return_routed_experts:
            assert len(tokens) == params.max_tokens
            assert_reference(state, p, tokens, rows)


def test_chunked_prefill_gives_the_rows_of_one_shot(engine, state) -> None:
    p = prompt(50, 5)
    one_shot = run(engine(), [(p, asking())])[0][0]
    chunked = run(engine(max_num_batched_tokens=8), [(p, asking())])[0][0]
    assert chunked[0] == one_shot[0]
    assert chunked[1] is not None and one_shot[1] is not None and np.array_equal(chunked[1], one_shot[1])
    assert_reference(state, p, *chunked)


def test_prefix_cache_hit_keeps_the_cached_tokens_rows(engine, state) -> None:
    e = engine()
    p = prompt(40, 6)
    bm = e.scheduler.block_manager
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    run(e, [(p, plain)])  # the prompt's blocks are in the prefix cache now
    hits = bm.num_prefix_hit_tokens
    run(e, [(p, plain)])
    assert bm.num_prefix_hit_tokens > hits  # a request that does not ask reads them
    hits = bm.num_prefix_hit_tokens
    tokens, rows = run(e, [(p, asking())])[0][0]
    assert bm.num_prefix_hit_tokens == hits  # one that asks computes its prompt
    assert_reference(state, p, tokens, rows)


def test_preemption_does_not_duplicate_rows(engine, state) -> None:
    reqs = [(prompt(10 + 3 * i, 20 + i), asking(30)) for i in range(8)]
    # 20 blocks of 4 = 80 tokens: far less than the 8 sequences need together.
    small = engine(num_blocks=20, max_model_len=80)
    outs = run(small, reqs)
    assert small.scheduler.num_preemptions > 0
    for (p, _), out in zip(reqs, outs, strict=True):
        assert_reference(state, p, *out[0])


def test_static_decode_path(engine, state) -> None:
    """Decode steps through the graph runner's static buffers: steps where some ask (their recording variant) and,
    once those finished, steps where nobody asks (the plain one), over buckets with padding rows."""
    e = engine(static_decode=True, max_num_seqs=8)
    reqs = [(prompt(5 + i, 40 + i), asking(4 + i) if i % 2 else SamplingParams(temperature=0.0, max_tokens=14))
            for i in range(5)]
    outs = run(e, reqs)
    decode = e.runner.decode_runner
    assert decode is not None and {(8, True), (4, False)} <= decode._prepared
    for (p, params), out in zip(reqs, outs, strict=True):
        tokens, rows = out[0]
        if params.return_routed_experts:
            assert_reference(state, p, tokens, rows)
        else:
            assert rows is None


def test_n_samples_each_have_their_rows(engine, state) -> None:
    p = prompt(9, 7)
    out = run(engine(), [(p, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                                            return_routed_experts=True))])[0]
    assert len({tuple(t) for t, _ in out.values()}) > 1  # they sampled different tokens
    for tokens, rows in out.values():
        assert_reference(state, p, tokens, rows)


def test_speculating_sequences_keep_only_the_accepted_tokens_rows(engine, state) -> None:
    """Steps verifying prompt-lookup drafts read 1 + k tokens per sequence; the rows of rejected drafts are dropped,
    so every choice's rows are still the reference's routing of the tokens it kept."""
    spec = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=2)
    e = engine(speculative_config=spec)
    # Prompts that repeat themselves, so lookup finds drafts; greedy output on the tiny model both follows and
    # leaves them.
    reqs = [((prompt(6, 60 + i) * 4)[:20 + i], asking(24)) for i in range(6)]
    outs = run(e, reqs)
    stats = e.scheduler.make_stats(0, 0, 0).spec_decoding
    assert stats is not None and 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # kept and rejected drafts
    for (p, _), out in zip(reqs, outs, strict=True):
        assert_reference(state, p, *out[0])


def test_refused_when_not_enabled() -> None:
    e = make_engine()
    with pytest.raises(ValueError, match="--enable-return-routed-experts"):
        e.validate([1, 2, 3], asking())


def test_record_keeps_one_row_per_position() -> None:
    rows = np.arange(10 * 2 * 3, dtype=np.int32).reshape(10, 2, 3)
    record = RoutedExpertsRecord()
    record.add(0, rows[:4])  # a prefill chunk
    record.add(4, rows[4:7])  # the next chunk
    assert np.array_equal(np.concatenate(record.take() or []), rows[:7])
    assert record.take() is None
    record.add(0, rows[:8])  # recomputed after a preemption: only position 7 is new
    assert np.array_equal(np.concatenate(record.take() or []), rows[7:8])
    with pytest.raises(AssertionError, match="without one"):
        record.add(9, rows[9:])  # position 8 was never computed
