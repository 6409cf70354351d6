"""Speculative decoding end to end on a tiny real model (float32): greedy output equals the output without drafts
token for token (mixed batches, chunked prefill, prefix-cache hits, preemption, penalties, min_tokens, stop tokens,
logprobs), and sampled output keeps the distribution (a chi-square test)."""

import asyncio
import random

import pytest
import torch

from model import PagedLatentCache, load_model, select_backends
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.speculative_config import SpeculativeConfig
from tests.model.conftest import TINY, random_state
from tests.server.engine_utils import run_all

VOCAB = TINY.vocab_size
REPEATED = 7  # the token whose lm_head bias is raised: greedy output repeats it about half the time
SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


def make_engine(spec: SpeculativeConfig | None, bias: float = 5.0, num_blocks: int = 256,
                max_num_batched_tokens: int = 256, max_num_seqs: int = 32, max_model_len: int = 256) -> Engine:
    """A started TINY engine (EOS 0) whose lm_head.bias of REPEATED is raised by `bias`: drafts of repeats are
    right about half the time at 5 (kept at every draft position), always right at 20."""
    state = random_state(TINY, 1)
    state["lm_head.bias"][REPEATED] += bias
    model = load_model(state, dtype=torch.float32, device="cpu", config=TINY,
                       backends=select_backends("cpu", torch.float32))
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, block_size=4, num_blocks=num_blocks)
    engine = Engine(ModelRunner(model, PagedLatentCache(TINY, num_blocks, 4, torch.float32), Sampler(seed=0), 0),
                    config, VOCAB, speculative_config=spec)
    engine.start()
    return engine


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(count)]


def run_both(requests: list[tuple[list[int], SamplingParams]], **engine_kwargs: object) -> tuple[list, list, Engine]:
    """The requests' outputs without and with speculation, and the speculating engine (shut down)."""
    outs, engines = [], []
    for spec in (None, SPEC):
        engine = make_engine(spec, **engine_kwargs)  # type: ignore[arg-type]
        try:
            outs.append(run_all(engine, requests))
        finally:
            engine.shutdown()
        bm = engine.scheduler.block_manager
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_total_blocks
        engines.append(engine)
    return outs[0], outs[1], engines[1]


def greedy(max_tokens: int = 30, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def accepted_per_position(engine: Engine) -> list[int]:
    return engine.scheduler.make_stats(0, 0, 0).spec_decoding.num_accepted_tokens_per_pos  # type: ignore[union-attr]


def test_greedy_equals_plain_decoding_in_mixed_chunked_batches() -> None:
    # 32 prompts of 1..40 tokens with a 48-token budget: prefill chunks, plain decodes (a sequence with no match or
    # one token left) and speculating decodes share steps; max_tokens 1..30.
    requests = [(p, greedy(1 + i % 30)) for i, p in enumerate(prompts(32, seed=0))]
    plain, spec, engine = run_both(requests, max_num_batched_tokens=48)
    assert spec == plain
    per_pos = accepted_per_position(engine)
    assert len(per_pos) == 4 and all(n > 0 for n in per_pos), per_pos  # kept drafts at every position


def test_greedy_equals_plain_decoding_after_prefix_cache_hits_and_preemption() -> None:
    shared = prompts(1, seed=1)[0] + [REPEATED] * 8
    requests = [(shared + p, greedy(40)) for p in prompts(12, seed=2)]
    # 40 blocks of 4 tokens for 16 sequences of up to 108 tokens: preemptions; the shared prefix is hit.
    plain, spec, engine = run_both(requests + requests[:4], num_blocks=40, max_model_len=128)
    assert spec == plain
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.block_manager.num_prefix_hit_tokens > 0
    assert sum(accepted_per_position(engine)) > 0


def test_penalties_min_tokens_stop_tokens_and_logprobs_as_without_drafts() -> None:
    base = prompts(8, seed=3)
    requests = [
        (base[0], greedy(frequency_penalty=0.4)),
        (base[1], greedy(presence_penalty=0.8, repetition_penalty=1.1)),
        (base[2], greedy(logit_bias={REPEATED: -2.0, 5: 3.0})),
        (base[3], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=12)),  # EOS banned for 12 tokens
        (base[4], greedy(stop_token_ids=[REPEATED])),  # a kept draft that is a stop token ends the sample
        (base[5], greedy(logprobs=3)),
        (base[6] + [REPEATED] * 6, greedy(max_tokens=3)),  # drafts capped by max_tokens
        (base[7], SamplingParams(temperature=0.0, max_tokens=30)),  # ends at EOS
    ]
    plain, spec, _ = run_both(requests)
    assert [r[0][1] for r in spec] == [r[0][1] for r in plain]
    assert spec[4][0][1] == "stop" and spec[4][0][0][-1] == REPEATED
    assert [r[0][0] for r in spec] == [r[0][0] for r in plain]


async def _tokens_and_logprobs(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list, list, list]:
    tokens, logprobs, top = [], [], []
    async for batch in engine.add_request("r", prompt, params):
        for out in batch:
            tokens += out.token_ids
            logprobs += out.logprobs or []
            top += out.top_logprobs or []
    return tokens, logprobs, top


def test_logprobs_of_returned_tokens_equal_the_plain_ones() -> None:
    outs = []
    for spec in (None, SPEC):
        engine = make_engine(spec)
        try:
            outs.append([asyncio.run(_tokens_and_logprobs(engine, p, greedy(20, logprobs=2)))
                         for p in prompts(3, seed=4)])
        finally:
            engine.shutdown()
    assert sum(accepted_per_position(engine)) > 0
    for (tokens_a, lp_a, top_a), (tokens_b, lp_b, top_b) in zip(*outs, strict=True):
        assert tokens_a == tokens_b and len(lp_b) == len(top_b) == 20
        torch.testing.assert_close(torch.tensor(lp_b), torch.tensor(lp_a), atol=1e-4, rtol=1e-4)
        assert [[t for t, _ in row] for row in top_b] == [[t for t, _ in row] for row in top_a]


def chi_square_p_value(table: list[list[int]]) -> float:
    """Two-sample chi-square test of homogeneity on counts [2, K]; cells pooled so each expected count is >= 5."""
    rows = torch.tensor(table, dtype=torch.float64)
    common = (rows.sum(0) >= 20).nonzero()[:, 0]
    pooled = torch.cat((rows[:, common], (rows.sum(1) - rows[:, common].sum(1))[:, None]), dim=1)
    pooled = pooled[:, pooled.sum(0) > 0]
    if pooled.shape[1] == 1:
        return 1.0  # one outcome in both samples
    expected = pooled.sum(1, keepdim=True) * pooled.sum(0, keepdim=True) / pooled.sum()
    stat = ((pooled - expected) ** 2 / expected).sum()
    df = pooled.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.9, top_k=8, top_p=0.97,
                                                                   frequency_penalty=0.3)])
def test_sampled_tokens_keep_their_distribution(params: dict) -> None:
    """Tokens 2..4 of 1,200 samples of one prompt through the whole engine (the first comes from the prefill,
    without drafts), spec against plain, per position. (server/engine/spec_verify.py's own test measures the
    verification against exact probabilities with the power to see a 2% bias.)"""
    prompt = [3, REPEATED, REPEATED, REPEATED, REPEATED]
    num = 1200
    samples = []
    for spec in (None, SPEC):
        engine = make_engine(spec, bias=14.0, max_num_seqs=256, max_num_batched_tokens=2048)
        try:
            outs = run_all(engine, [(prompt, SamplingParams(max_tokens=4, ignore_eos=True, **params))] * num)
        finally:
            engine.shutdown()
        samples.append([[out[0][0][pos] for out in outs] for pos in range(1, 4)])
        if spec is not None:
            assert sum(accepted_per_position(engine)) > num // 2
    for pos in range(3):
        tokens = sorted(set(samples[0][pos]) | set(samples[1][pos]))
        table = [[arm[pos].count(t) for t in tokens] for arm in samples]
        assert chi_square_p_value(table) > 1e-3, (pos, table)
