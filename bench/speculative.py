"""Speculative decoding (prompt-lookup drafts) on the seed model: tok/s with and without it, at both ends.

Usage: python bench/speculative.py [--streams 1,8,32] [--max-tokens 48] [--prompt-len 16] [--rounds 2]
                                   [--speculative-config JSON]
With random weights no workload has a realistic acceptance rate, so the two ends are measured:
- drafts always right: lm_head.bias of one token raised by +300 (above the logits' range), so greedy decoding
  repeats it and prompt lookup predicts every draft: the ceiling of what verification gives;
- drafts never right: the random model on random prompts: drafts are proposed where an n-gram recurs and rejected,
  the overhead.
Then the speed-up a trained checkpoint would see at acceptance rate a (each draft token kept with probability a)
is (1 - a^(k+1)) / (1 - a) tokens per step at the measured cost of a step verifying k drafts. Plain and speculative
runs alternate within one run (the host's speed drifts); each figure is the best of --rounds. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import torch

# Run as `python bench/speculative.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import CustomLLM, PagedLatentCache
from model.ops.cpu_extension import cpu_flags
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.speculative_config import SpeculativeConfig
from server.startup import load_for_serving, off_main_thread, resolve_dtype

BLOCK = 16
ALWAYS_RIGHT_BIAS = 300.0
REPEATED_TOKEN = 1000


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


async def _generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> int:
        return sum([len(o.token_ids) async for batch in engine.add_request(f"r{i}", prompt, params) for o in batch])

    return sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def run(model: CustomLLM, cache: PagedLatentCache, spec: SpeculativeConfig | None, prompts: list[list[int]],
        max_tokens: int) -> tuple[float, float, float, int]:
    """tok/s, seconds per engine step, mean tokens a speculating sequence gets per step (1 without drafts) and the
    draft tokens proposed."""
    max_len = min(cache.num_blocks * BLOCK, model.config.max_position_embeddings)
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=max_len, block_size=BLOCK,
                             num_blocks=cache.num_blocks)
    engine = Engine(ModelRunner(model, cache, Sampler(seed=0), eos_token_id=0), config, model.config.vocab_size,
                    speculative_config=spec)
    engine.start()
    try:
        start = time.perf_counter()
        tokens = asyncio.run(_generate(engine, prompts, max_tokens))
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
    stats = engine.scheduler.make_stats(0, 0, 0).spec_decoding
    if stats is None:
        return tokens / elapsed, elapsed / engine.num_steps, 1.0, 0
    return (tokens / elapsed, elapsed / engine.num_steps, 1 + stats.num_accepted_tokens / stats.num_drafts,
            stats.num_draft_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4, '
                                                        '"prompt_lookup_min": 1, "prompt_lookup_max": 3}')
    args = parser.parse_args()
    spec = SpeculativeConfig.from_json(args.speculative_config)
    streams = [int(s) for s in args.streams.split(",")]
    dtype = resolve_dtype("auto", torch.device("cpu"))
    model = off_main_thread(lambda: load_for_serving(None, dtype, torch.device("cpu"), seed=0))
    num_blocks = max(streams) * -(-(args.prompt_len + args.max_tokens + spec.num_speculative_tokens) // BLOCK) + 1
    cache = PagedLatentCache(model.config, num_blocks, BLOCK, dtype)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    print(f"# {cpu_name()} ({'+'.join(sorted(cpu_flags() & {'avx2', 'fma', 'avx512f'}))}), {torch.get_num_threads()} "
          f"threads, {dtype}, seed model (random weights), greedy, prompt {args.prompt_len} tokens, "
          f"{args.max_tokens} generated per stream, {args.speculative_config}")
    print("| drafts | streams | plain tok/s | spec tok/s | speed-up | mean accepted length | acceptance "
          "| draft tokens |")
    print("|---|---|---|---|---|---|---|---|")
    step_cost: dict[int, tuple[float, float]] = {}
    k = spec.num_speculative_tokens
    for end in ("always right", "never right"):
        bias = model.lm_head.bias
        assert bias is not None
        if end == "always right":
            bias.data[REPEATED_TOKEN] += ALWAYS_RIGHT_BIAS
        for n in streams:
            prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(n)]
            best: dict[str, tuple[float, float, float, int]] = {}
            for r in range(args.rounds):
                pair = (("plain", None), ("spec", spec))
                for name, cfg in pair if r % 2 == 0 else pair[::-1]:  # the order alternates: no arm always first
                    result = run(model, cache, cfg, prompts, args.max_tokens)
                    if name not in best or result[0] > best[name][0]:
                        best[name] = result
            (plain, plain_step, _, _), (fast, spec_step, mean_len, num_drafted) = best["plain"], best["spec"]
            if end == "always right":
                step_cost[n] = (plain_step, spec_step)
            print(f"| {end} | {n} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | {mean_len:.2f} | "
                  f"{(mean_len - 1) / k:.0%} | {num_drafted} |", flush=True)
        if end == "always right":
            bias.data[REPEATED_TOKEN] -= ALWAYS_RIGHT_BIAS
    print(f"\n# speed-up at acceptance rate a, from the step costs measured above (k = {k})")
    rates = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0]
    print("| streams | " + " | ".join(f"a={a:g}" for a in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for n, (plain_step, spec_step) in step_cost.items():
        gains = [(k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)) * plain_step / spec_step for a in rates]
        print(f"| {n} | " + " | ".join(f"{g:.2f}x" for g in gains) + " |")


if __name__ == "__main__":
    main()
