"""Where a seed-model decode step's time goes: per op (torch.profiler), per part of a layer, and in Python.

Usage: python bench/decode_profile.py [--dtype bfloat16] [--batch 1] [--context 256] [--steps 20]
                                      [--top 25] [--backend auto] [--attention auto] [--moe auto]
                                      [--decode-layer auto|modules|cpp]

Three views of the same step (random weights, metadata built per step as the server does, logits included):
1. Wall time per step without any instrumentation (median of --steps).
2. Per part (embeddings, each layer's norms / attention / MoE, lm_head): the wall time between forward hooks,
   summed over the layers, median per step.
3. Per op (torch.profiler): calls and self time per step; "ops" is the time inside the profiled ops, and the
   step's wall time under the profiler minus that is Python and dispatch outside any op (the profiler's own
   bookkeeping included, so it is an upper bound on Python's share).
Prints tables; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

# Run as `python bench/decode_profile.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_step import decode_step, load_seed_model, make_cache
from model import CustomLLM, ModelConfig


def median_ms(step: Callable[[], object], steps: int) -> float:
    """Median wall time of `steps` calls after two warm-ups, in ms."""
    step()
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def part_times(model: CustomLLM, step: Callable[[], object], steps: int) -> dict[str, float]:
    """Median ms per step of each part, measured between forward pre/post hooks (summed over the layers)."""
    totals: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}

    def hook(name: str, module: nn.Module) -> None:
        def pre(*_: object) -> None:
            started[name] = time.perf_counter()

        def post(*_: object) -> None:
            current[name] += time.perf_counter() - started[name]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for layer in model.decoder_layers:
        for name in ("input_norm", "self_attn", "post_attn_norm"):
            hook(name, getattr(layer, name))
        hook("moe", layer.mlp.moe)
        hook("self_attn.o_proj", layer.self_attn.o_proj)
        hook("decoder layer (whole)", layer)
    hook("lm_head", model.lm_head)
    step()
    for _ in range(steps):
        current.clear()
        start = time.perf_counter()
        step()
        current["step (whole)"] = time.perf_counter() - start
        for name, seconds in current.items():
            totals[name].append(seconds)
    return {name: statistics.median(values) * 1e3 for name, values in totals.items()}


def op_table(step: Callable[[], object], steps: int, top: int) -> None:
    """Per op: calls and self ms per step (torch.profiler), and the time outside every op."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps * 1e3
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    inside = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    calls = sum(e.count for e in events) / steps
    print(f"\nper op (torch.profiler, {steps} steps): {wall:.1f} ms per step under the profiler, "
          f"{inside:.1f} ms inside {calls:.0f} op calls, {wall - inside:.1f} ms outside them (Python, dispatch "
          "and the profiler's bookkeeping)")
    print(f"  {'op':<40} {'calls':>6} {'self ms':>8} {'us/call':>8}")
    for e in rows[:top]:
        per_step = e.self_cpu_time_total / steps / 1e3
        print(f"  {e.key[:40]:<40} {e.count / steps:6.0f} {per_step:8.2f} {e.self_cpu_time_total / e.count:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--backend", default="auto", help="linear backend")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--moe", default="auto")
    parser.add_argument("--decode-layer", default="auto", help="modules: every layer from Python")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = load_seed_model(dtype, args.backend, attention=args.attention, moe=args.moe,
                            decode_layer=args.decode_layer)
    cache = make_cache(ModelConfig(), dtype, args.batch, args.context, prompt=0)
    step = decode_step(model, cache, args.batch, args.context)
    print(f"{args.dtype} batch {args.batch}, context {args.context}, threads {torch.get_num_threads()}")
    print(f"step without instrumentation: {median_ms(step, args.steps):.1f} ms (median of {args.steps})")
    parts = part_times(model, step, args.steps)
    print(f"\nper part (forward hooks, median of {args.steps} steps, summed over layers), ms per step:")
    for name, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {ms:7.2f}")
    op_table(step, args.steps, args.top)


if __name__ == "__main__":
    main()
