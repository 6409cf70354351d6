"""Seed-model step timings on this machine: decode at several batch sizes, prefill throughput, KV bytes/token.

Usage: python bench/model_step.py [--dtypes bfloat16,float32] [--batches 1,8,32,64] [--context 256]
Random weights (timing does not depend on their values). Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from model import AttentionMetadata, ModelConfig, PagedLatentCache, load_model

BLOCK = 16


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=256, help="cached tokens per sequence at decode")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = ModelConfig()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"threads={torch.get_num_threads()} context={args.context} prompt={args.prompt}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model = load_model(None, dtype=dtype, config=config)
        blocks_per_seq = -(-(args.context + 1) // BLOCK)
        num_blocks = max(max(batches) * blocks_per_seq, -(-args.prompt // BLOCK)) + 1
        cache = PagedLatentCache(config, num_blocks, BLOCK, dtype)
        print(f"\n{dtype_name}: KV cache {PagedLatentCache.bytes_per_token(config, dtype):,} bytes per token")
        for batch in batches:
            tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(batch)]
            meta = AttentionMetadata.build([1] * batch, [args.context + 1] * batch, tables, BLOCK)
            ids = torch.randint(0, config.vocab_size, (batch,))
            pos = torch.full((batch,), args.context)

            def step() -> None:
                hidden = model(ids, pos, meta, cache.layers)
                model.compute_logits(hidden)

            seconds = time_it(step, args.repeats)
            print(f"  decode batch {batch:3d}: {seconds * 1e3:8.1f} ms/step  {batch / seconds:8.1f} tok/s")
        meta = AttentionMetadata.build([args.prompt], [args.prompt], [list(range(1, 1 + -(-args.prompt // BLOCK)))],
                                       BLOCK)
        ids = torch.randint(0, config.vocab_size, (args.prompt,))
        pos = torch.arange(args.prompt)

        def prefill() -> None:
            hidden = model(ids, pos, meta, cache.layers)
            model.compute_logits(hidden[-1:])

        seconds = time_it(prefill, max(1, args.repeats // 2))
        print(f"  prefill {args.prompt} tokens: {seconds * 1e3:8.1f} ms  {args.prompt / seconds:8.1f} tok/s")
        del model, cache


if __name__ == "__main__":
    main()
