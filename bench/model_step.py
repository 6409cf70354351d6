"""Seed-model step timings on this machine: decode at several batch sizes, prefill throughput, KV bytes/token.

Usage: python bench/model_step.py [--dtypes bfloat16,float32] [--batches 1,8,32,64] [--context 256]
                                  [--backend auto|plain|onednn-packed] [--threads N]
Random weights (timing does not depend on their values). Prints a table; not a test. Each figure is the best
of --repeats runs: other work on a shared machine only ever slows a run down.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as `python bench/model_step.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import (
    AttentionMetadata,
    CustomLLM,
    ModelConfig,
    PagedLatentCache,
    load_model,
    select_backends,
)
from model.kv_cache import blocks_for

BLOCK = 16


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_cache(config: ModelConfig, dtype: torch.dtype, max_batch: int, context: int, prompt: int) -> PagedLatentCache:
    """A cache big enough for max_batch decode sequences of `context` tokens, or one prompt (block 0 unused)."""
    num_blocks = max(max_batch * blocks_per_seq(context), blocks_for(prompt, BLOCK)) + 1
    return PagedLatentCache(config, num_blocks, BLOCK, dtype)


def blocks_per_seq(context: int) -> int:
    return blocks_for(context + 1, BLOCK)


def decode_step(model: CustomLLM, cache: PagedLatentCache, batch: int, context: int) -> Callable[[], torch.Tensor]:
    """One decode step of `batch` sequences with `context` cached tokens each, logits included."""
    per_seq = blocks_per_seq(context)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    ids = torch.randint(0, model.config.vocab_size, (batch,))
    pos = torch.full((batch,), context)

    def step() -> torch.Tensor:
        # The metadata is built per step, as the server does.
        meta = AttentionMetadata.build([1] * batch, [context + 1] * batch, tables, BLOCK)
        return model.compute_logits(model(ids, pos, meta, cache.layers))

    return step


def prefill_step(model: CustomLLM, cache: PagedLatentCache, prompt: int) -> Callable[[], torch.Tensor]:
    """One prefill of a `prompt`-token sequence, logits of its last token included."""
    table = list(range(1, 1 + blocks_for(prompt, BLOCK)))
    ids = torch.randint(0, model.config.vocab_size, (prompt,))
    pos = torch.arange(prompt)

    def step() -> torch.Tensor:
        meta = AttentionMetadata.build([prompt], [prompt], [table], BLOCK)
        return model.compute_logits(model(ids, pos, meta, cache.layers)[-1:])

    return step


def load_seed_model(dtype: torch.dtype, backend: str = "auto", **others: str) -> CustomLLM:
    """The seed architecture with random weights on linear `backend` (others: attention=, moe=, decode_layer=
    names); prints the load time."""
    start = time.perf_counter()
    backends = select_backends("cpu", dtype, linear=backend, **others)
    model = load_model(None, dtype=dtype, config=ModelConfig(), backends=backends)
    print(f"  load (random init + processing, backends {', '.join(c.backend.name for c in backends.choices)}): "
          f"{time.perf_counter() - start:.1f} s")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=256, help="cached tokens per sequence at decode")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length (0 skips prefill)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto", help="linear backend: auto, plain or onednn-packed")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"threads={torch.get_num_threads()} context={args.context} prompt={args.prompt} best of {args.repeats}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        print(f"\n{dtype_name}: KV cache {PagedLatentCache.bytes_per_token(config, dtype):,} bytes per token")
        model = load_seed_model(dtype, args.backend)
        cache = make_cache(config, dtype, max(batches), args.context, args.prompt)
        for batch in batches:
            seconds = best_time(decode_step(model, cache, batch, args.context), args.repeats)
            print(f"  decode batch {batch:3d}: {seconds * 1e3:8.1f} ms/step  {batch / seconds:8.1f} tok/s")
        if args.prompt:
            seconds = best_time(prefill_step(model, cache, args.prompt), max(1, args.repeats // 2))
            print(f"  prefill {args.prompt} tokens: {seconds * 1e3:8.1f} ms  {args.prompt / seconds:8.1f} tok/s")
        del model, cache


if __name__ == "__main__":
    main()
