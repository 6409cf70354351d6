"""Issue 19.1: seeded requests replayed solo, batched, after prefix-cache hits, under preemption and with the
prompt split into other chunks, on a model with the real 49,152-token vocabulary (where last-bit logit noise
used to move the draw). docs/api.md "Seeds" states what holds. The draw's robustness to that noise is tested alone in
test_sampler_draws.py (test_seeded_draw_is_robust_to_last_bit_noise_in_the_logits)."""

from __future__ import annotations

import random

import torch

from model import PagedLatentCache
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerConfig
from tests.model.conftest import random_model
from tests.server.engine_utils import run_all
from tests.server.live import TINY_SERVE

NUM_REQUESTS, MAX_TOKENS = 12, 40


def make_engine(dtype: torch.dtype, num_blocks: int = 256, max_num_batched_tokens: int = 512,
                enable_prefix_caching: bool = True) -> Engine:
    model = random_model(TINY_SERVE, 0, dtype)
    cache = PagedLatentCache(TINY_SERVE, num_blocks, 16, dtype)
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens, max_model_len=256,
                             block_size=16, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching)
    engine = Engine(ModelRunner(model, cache, Sampler(seed=0), eos_token_id=0), config, TINY_SERVE.vocab_size)
    engine.start()
    return engine


def seeded_requests() -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(0)
    return [([rng.randrange(1, TINY_SERVE.vocab_size) for _ in range(rng.randint(40, 130))],
             SamplingParams(temperature=1.0, seed=3000 + i, max_tokens=MAX_TOKENS, ignore_eos=True))
            for i in range(NUM_REQUESTS)]


def replays(dtype: torch.dtype) -> dict[str, list[list[int]]]:
    """Every request's tokens under each way of running it."""
    reqs = seeded_requests()
    runs: dict[str, list[list[int]]] = {}
    engine = make_engine(dtype)
    try:
        runs["solo"] = [run_all(engine, [r])[0][0][0] for r in reqs]  # computes each prompt
        runs["solo, prompt from the prefix cache"] = [run_all(engine, [r])[0][0][0] for r in reqs]
        runs["batched"] = [out[0][0] for out in run_all(make_engine_free(engine), reqs)]
    finally:
        engine.shutdown()
    chunked = make_engine(dtype, max_num_batched_tokens=48, enable_prefix_caching=False)
    try:
        runs["batched, prompts in 48-token chunks"] = [out[0][0] for out in run_all(chunked, reqs)]
    finally:
        chunked.shutdown()
    # 20 blocks of 16 tokens hold ~3 of the 12 sequences: the rest are preempted and recomputed.
    tight = make_engine(dtype, num_blocks=20)
    try:
        runs["batched under preemption"] = [out[0][0] for out in run_all(tight, reqs)]
        assert tight.scheduler.num_preemptions > 0
    finally:
        tight.shutdown()
    return runs


def make_engine_free(engine: Engine) -> Engine:
    """The same engine, its prefix cache emptied of these prompts by other traffic: every prompt recomputed."""
    filler = [(list(range(1000 + 300 * i, 1000 + 300 * i + 200)),
               SamplingParams(temperature=0.0, max_tokens=1)) for i in range(6)]
    run_all(engine, filler)
    return engine


def mismatches(runs: dict[str, list[list[int]]]) -> dict[str, list[tuple[int, int]]]:
    """(request, first differing token) of each way against solo."""
    solo = runs["solo"]
    out: dict[str, list[tuple[int, int]]] = {}
    for name, tokens in runs.items():
        diffs = []
        for i, (a, b) in enumerate(zip(solo, tokens, strict=True)):
            assert len(b) == MAX_TOKENS
            if a != b:
                diffs.append((i, next(j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)))
        out[name] = diffs
    return out


def test_float32_seeded_requests_replay_exactly_whatever_the_batch_cache_or_preemption() -> None:
    runs = replays(torch.float32)
    diffs = mismatches(runs)
    assert all(not d for d in diffs.values()), diffs
    assert len({tuple(t) for t in runs["solo"]}) == NUM_REQUESTS


if __name__ == "__main__":
    # docs/api.md's bf16 figures: python -m tests.server.engine.test_seeded_replay bfloat16 (not asserted in CI:
    # bf16 rounding depends on the CPU's kernels).
    import sys

    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "bfloat16")
    for name, d in mismatches(replays(dtype)).items():
        print(f"{name}: {len(d)} of {NUM_REQUESTS} differ from solo (request, first differing token): {d}")
