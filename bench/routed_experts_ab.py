"""A/B of the routed-experts capture on the engine's decode step: what --enable-return-routed-experts costs when no
request asks for them, and what recording costs when every sequence asks.

Usage: python bench/routed_experts_ab.py [--dtype bfloat16] [--batches 1,64] [--context 256] [--rounds 8]
                                         [--threads N]

Variants, alternating within each round (the order rotates every round) over one seed model and one cache:
off = a ModelRunner without the flag; on = with the flag, no sequence asking; asking = with the flag, every sequence
asking. Each timed call is one whole decode step as the engine runs it: ModelRunner.execute (inputs, forward,
logits, greedy sampling, the rows' read-back) and the rows handed to the sequences' records. Each round takes the
best of --repeats calls per variant; the script prints min / median / max over the rounds, in ms per step.
Random weights; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as `python bench/routed_experts_ab.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_step import BLOCK, blocks_per_seq, load_seed_model, make_cache
from model import CustomLLM, ModelConfig, PagedLatentCache
from server.engine.model_runner import ModelRunner
from server.engine.routed_experts import RoutedExpertsRecord, record_step
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledSequence
from server.engine.sequence import Sequence

VARIANTS = ("off", "on", "asking")


def decode_batch(batch: int, context: int, vocab_size: int, ask: bool) -> list[ScheduledSequence]:
    """`batch` sequences each decoding its token at position `context` (the cache's blocks 1.. hold their context)."""
    per_seq = blocks_per_seq(context)
    params = SamplingParams(temperature=0.0, max_tokens=16, return_routed_experts=ask)
    scheduled = []
    for i in range(batch):
        ids = [(7 * i + j) % vocab_size for j in range(context + 1)]
        seq = Sequence(i, f"r{i}", ids, params.max_tokens, 0.0, SamplingState(params, ids))
        seq.block_table = list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))
        seq.num_computed_tokens = context
        seq.routed_experts = RoutedExpertsRecord() if ask else None
        scheduled.append(ScheduledSequence(seq, 1))
    return scheduled


def engine_step(runner: ModelRunner, scheduled: list[ScheduledSequence], context: int) -> Callable[[], None]:
    """One decode step as the engine runs it (the same step again each call: no token is appended)."""
    def step() -> None:
        out = runner.execute(scheduled)
        for s in scheduled:
            if s.seq.routed_experts is not None:  # each call records position `context` afresh
                s.seq.routed_experts.num_rows = context
        record_step(scheduled, out.routed_experts)
        for s in scheduled:
            if s.seq.routed_experts is not None:
                s.seq.routed_experts.take()
    return step


def best_ms(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up after the switch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant per round (best taken)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    model: CustomLLM = load_seed_model(dtype)
    config = model.config
    cache: PagedLatentCache = make_cache(ModelConfig(), dtype, max(batches), args.context, prompt=0)
    assert cache.block_size == BLOCK
    runners = {flag: ModelRunner(model, cache, Sampler(seed=0), eos_token_id=0, enable_return_routed_experts=flag)
               for flag in (False, True)}
    print(f"{args.dtype} threads={torch.get_num_threads()} context={args.context}; per round the best of "
          f"{args.repeats} steps per variant, variants alternating; ms per step, min / median / max of "
          f"{args.rounds} rounds")
    for batch in batches:
        steps = {
            "off": engine_step(runners[False], decode_batch(batch, args.context, config.vocab_size, False),
                               args.context),
            "on": engine_step(runners[True], decode_batch(batch, args.context, config.vocab_size, False),
                              args.context),
            "asking": engine_step(runners[True], decode_batch(batch, args.context, config.vocab_size, True),
                                  args.context),
        }
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for name in order:
                times[name].append(best_ms(steps[name], args.repeats))
        print(f"  batch {batch:3d}: " + "   ".join(
            f"{name} {min(t):7.1f} / {statistics.median(t):7.1f} / {max(t):7.1f}" for name, t in times.items()))
        # Paired per round: the sign of on - off should change from round to round if the flag costs nothing.
        diffs = [on - off for on, off in zip(times["on"], times["off"], strict=True)]
        print(f"             on - off per round: {' '.join(f'{d:+.1f}' for d in diffs)}", flush=True)


if __name__ == "__main__":
    main()
