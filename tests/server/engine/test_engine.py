"""The engine end to end on a tiny real model: batching invariance, seeds, preemption, chunked prefill,
prefix caching, aborts, validation."""

import asyncio
import random

import pytest

from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams
from tests.server.engine_utils import collect, run_all

VOCAB = 97


def prompts(count: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_batch_of_16_equals_each_alone(engine) -> None:
    e = engine()
    reqs = [(p, greedy(8 + i % 5)) for i, p in enumerate(prompts(16))]
    together = run_all(e, reqs)
    alone = [run_all(e, [r])[0] for r in reqs]
    assert together == alone
    for out, (_, params) in zip(together, reqs, strict=True):
        assert out[0][1] == "length" and len(out[0][0]) == params.max_tokens


def test_seeded_sample_is_batch_independent(engine) -> None:
    e = engine()
    target = ([5, 6, 7, 8, 9], SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True))
    alone = run_all(e, [target])[0]
    others = [(p, SamplingParams(temperature=0.8, max_tokens=15, seed=i if i % 2 else None, ignore_eos=True))
              for i, p in enumerate(prompts(8, seed=3))]
    batched = run_all(e, [*others[:4], target, *others[4:]])[4]
    assert alone == batched
    different = run_all(e, [(target[0], SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True))])
    assert different[0] != alone


def test_preemption_gives_identical_results(engine) -> None:
    reqs = [(p, greedy(30)) for p in prompts(10, seed=5, lo=10, hi=40)]
    reqs[3] = (reqs[3][0], SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True))
    expected = run_all(engine(), reqs)
    # 20 blocks of 4 = 80 tokens: far less than the 10 sequences need together.
    small = engine(num_blocks=20, max_model_len=80, enable_prefix_caching=False)
    assert run_all(small, reqs) == expected
    assert small.scheduler.num_preemptions > 0


def test_decodes_progress_every_step_during_long_chunked_prefill(engine) -> None:
    e = engine(num_blocks=600, max_model_len=2048, max_num_batched_tokens=128)

    async def main() -> None:
        decoders = [asyncio.ensure_future(collect(e, f"d{i}", p, greedy(40))) for i, p in enumerate(prompts(8))]
        while e.num_steps < 3:  # all eight are decoding
            await asyncio.sleep(0.01)
        long_prompt = prompts(1, seed=9, lo=1500, hi=1500)[0]
        steps_before = e.num_steps
        counts_before = [s.num_generated_tokens for s in e.scheduler.running]
        long = asyncio.ensure_future(collect(e, "long", long_prompt, greedy(2)))
        while not any(s.request_id == "long" and s.num_generated_tokens for s in e.scheduler.running):
            await asyncio.sleep(0.001)
            if long.done():
                break
        steps = e.num_steps - steps_before
        assert steps >= 1500 // 128  # the prompt was split into chunks over many steps
        gained = [s.num_generated_tokens - c for s, c in zip(e.scheduler.running[:8], counts_before, strict=False)]
        assert all(g >= steps - 1 for g in gained), (gained, steps)
        await asyncio.gather(long, *decoders)

    asyncio.run(main())


def test_prefix_cache_reuses_a_64_token_prefix(engine) -> None:
    e = engine(block_size=16)
    prefix = prompts(1, seed=11, lo=64, hi=64)[0]
    first = run_all(e, [([*prefix, 1, 2, 3], greedy(5))])
    bm = e.scheduler.block_manager
    hits_before = bm.num_prefix_hit_tokens

    async def main():
        stream_result = await collect(e, "second", [*prefix, 1, 2, 3], greedy(5))
        return stream_result

    second = asyncio.run(main())
    assert second == first[0]
    assert bm.num_prefix_hit_tokens - hits_before == 64  # only the 3 new tokens were computed


def test_prefix_cache_eviction_under_pressure_stays_correct(engine) -> None:
    e = engine(num_blocks=24, max_model_len=96, block_size=4)
    reqs = [(p, greedy(10)) for p in prompts(12, seed=13, lo=30, hi=60)]
    expected = run_all(engine(), reqs)
    assert [run_all(e, [r])[0] for r in reqs] == expected
    assert run_all(e, reqs) == expected  # again, now mixing cached, evicted and recomputed blocks


def test_abort_mid_prefill_and_mid_decode_frees_blocks(engine) -> None:
    e = engine(num_blocks=600, max_model_len=2048, max_num_batched_tokens=64)
    bm = e.scheduler.block_manager

    async def main() -> None:
        long = asyncio.ensure_future(collect(e, "long", prompts(1, seed=2, lo=1200, hi=1200)[0], greedy(5)))
        dec = asyncio.ensure_future(collect(e, "dec", [1, 2, 3], greedy(200)))
        while not any(s.request_id == "long" and s.num_computed_tokens > 0 for s in e.scheduler.running):
            await asyncio.sleep(0.001)
        e.abort("long")
        while not any(s.request_id == "dec" and s.num_generated_tokens > 3 for s in e.scheduler.running):
            await asyncio.sleep(0.001)
        e.abort("dec")
        results = await asyncio.gather(long, dec)
        assert results[0][0][1] == "abort" and results[1][0][1] == "abort"
        assert len(results[0][0][0]) == 0 and 3 < len(results[1][0][0]) < 200

    asyncio.run(main())
    assert bm.num_free_blocks == bm.num_total_blocks
    assert e.num_unfinished == 0


def test_n_samples_share_the_prompt_and_differ(engine) -> None:
    e = engine()
    out = run_all(e, [(prompts(1, seed=4, lo=40, hi=40)[0],
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True))])[0]
    assert sorted(out) == [0, 1, 2]
    assert len({tuple(toks) for toks, _ in out.values()}) == 3
    # Samples 1 and 2 waited one step for sample 0's prompt blocks: 36 of 40 prompt tokens each came
    # from the prefix cache (the last block is never taken whole: its last token must be computed).
    assert e.scheduler.block_manager.num_prefix_hit_tokens == 2 * 36


def test_eos_and_stop_token_ids_finish_with_stop(engine) -> None:
    e = engine()
    out = run_all(e, [([3, 4, 5], greedy(6))])[0][0][0]
    stop_at = out[2]
    res = run_all(e, [([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(stop_at,)))])
    tokens, reason = res[0][0]
    assert reason == "stop" and tokens[-1] == stop_at and len(tokens) == out.index(stop_at) + 1


def test_bad_requests_are_rejected_with_the_field_named(engine) -> None:
    e = engine(max_model_len=64)

    async def main() -> None:
        with pytest.raises(ValueError, match="maximum context length is 64"):
            e.add_request("a", [1] * 60, greedy(10))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            e.add_request("b", [1, 500], greedy(2))
        with pytest.raises(ValueError, match="logit_bias"):
            e.add_request("c", [1], SamplingParams(logit_bias={1000: 1.0}))
        with pytest.raises(ValueError, match="at least one token"):
            e.add_request("d", [], greedy(2))
    asyncio.run(main())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_prompt_logprobs_whole_chunked_and_prompt_only(engine) -> None:
    """Prompt logprobs are the same whether the prompt runs in one step or in 7-token chunks; max_tokens 0
    ends after the prompt with no token; the prefix cache is not read for a scored prompt."""
    prompt = prompts(1, seed=9, lo=40, hi=40)[0]

    def scored(e: Engine, max_tokens: int) -> tuple[list, list[int], str]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=3, ignore_eos=True)

        async def main() -> tuple[list, list[int], str]:
            entries, tokens, reason = None, [], ""
            async for batch in e.add_request("p", prompt, params):
                for out in batch:
                    entries = out.prompt_logprobs if out.prompt_logprobs is not None else entries
                    tokens += out.token_ids
                    reason = out.finish_reason or reason
            return entries, tokens, reason
        return asyncio.run(main())

    whole = engine()
    run_all(whole, [(prompt, greedy(2))])  # caches the prompt's blocks
    hits = whole.scheduler.num_prefix_hit_tokens
    entries, tokens, reason = scored(whole, 3)
    assert whole.scheduler.num_prefix_hit_tokens == hits
    assert len(tokens) == 3 and reason == "length"
    assert entries[0] is None and [e.token_id for e in entries[1:]] == prompt[1:]
    chunked = engine(max_num_batched_tokens=7)
    chunked_entries, none, prompt_only = scored(chunked, 0)
    assert none == [] and prompt_only == "length"
    for a, b in zip(entries[1:], chunked_entries[1:], strict=True):
        assert a.rank == b.rank and abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == 3
        assert all(lp <= a.top[0][1] for _, lp in a.top) and (a.rank == 1) == (a.top[0][0] == a.token_id)
