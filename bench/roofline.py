"""This machine's roofline for a seed-model decode step, next to the measured step time.

Measures peak GEMM FLOP/s (a large square matmul, bf16 and fp32) and memory read bandwidth (summing a
tensor far larger than the caches), then for each batch prints the lower bound on a decode step,
max(bytes read / bandwidth, FLOPs / peak GEMM rate), and the step time the model achieves.

Bytes read per step: the weights the step touches (attention, router, lm_head, the shared experts and the
routed experts that receive a token: the expected number under uniform top-k routing, so 2 of 7 at batch 1
and all 7 from batch ~32) plus every sequence's latent KV cache. FLOPs: 2 per multiply-add of those GEMMs
for every token, plus absorbed attention over the cached context.

The host's speed drifts, the GEMM peak with it, so the steps are measured in rounds, each right after its own
measurement of the peak, and each step is compared with its round's bound; the table shows the round with the
median share of the bound and lists every round's.

Usage: python bench/roofline.py [--batches 1,8,32,64] [--context 256] [--dtype bfloat16] [--rounds 3]
                               [--no-measure]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as `python bench/roofline.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_step import best_time, decode_step, load_seed_model, make_cache
from model import ModelConfig, PagedLatentCache
from model.ops.linear import LINEAR
from model.ops.registry import Target, select


@dataclasses.dataclass(frozen=True)
class Machine:
    gemm_flops: float  # FLOP/s of a large square matmul in the step's dtype
    read_bandwidth: float  # bytes/s


def _best_of_rounds(fn: Callable[[], object], repeats: int, rounds: int = 3) -> float:
    """Fastest call over a few rounds a moment apart: a burst of other work on a shared machine (which can
    take a core for a whole round) only ever slows a call down."""
    best = float("inf")
    for _ in range(rounds):
        best = min(best, best_time(fn, repeats))
        time.sleep(0.3)
    return best


def measure_gemm(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size x size x size matmul: the best of torch's matmul and the linear backend the model
    would run in this dtype (on a CPU without native bfloat16, torch's bfloat16 matmul takes a reference path
    20-100x slower than the extension's kernel, which would make the bound meaningless)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    backend = select(LINEAR, Target(torch.device("cpu"), dtype)).backend
    weight = backend.process(b)
    candidates = [lambda: backend.apply(a, weight)]
    # torch's own matmul as a second candidate only beside a packed backend: "plain" is that matmul already,
    # and cpp-bf16 runs exactly where torch's bfloat16 matmul is the slow reference path.
    if backend.name not in ("plain", "cpp-bf16"):
        candidates.append(lambda: torch.mm(a, b))
    return max(2 * size**3 / _best_of_rounds(fn, repeats) for fn in candidates)


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of summing a float32 tensor far larger than any cache (the sum's compute is negligible)."""
    x = torch.ones(megabytes * (1 << 20) // 4)
    return x.numel() * 4 / _best_of_rounds(x.sum, repeats)


def expected_routed_experts(config: ModelConfig, batch: int) -> float:
    """Routed experts per layer that receive at least one of `batch` tokens, each picking top_k uniformly."""
    e, k = config.num_routed_experts, config.top_k_experts
    return e * (1 - (1 - k / e) ** batch)


def decode_cost(config: ModelConfig, batch: int, context: int, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step: `batch` sequences, `context` cached tokens each, logits included."""
    d, lat, h = config.hidden_size, config.latent_dim, config.num_attention_heads
    n, r, dh, i = config.nope_dim, config.rope_dim, config.head_dim, config.intermediate_size
    # Weights per layer (elements), as the checkpoint lists them.
    attention = 2 * d * lat + d * h * r + lat * h * n + lat * h * dh + lat * h * n + lat * h * r + h * dh * d
    expert = 3 * d * i
    router = d * config.num_routed_experts
    routed = expected_routed_experts(config, batch)
    head = config.vocab_size * d
    elem = torch.finfo(dtype).bits // 8
    weight_elems = config.num_hidden_layers * (attention + router + expert * (config.num_shared_experts + routed))
    weight_elems += head + 2 * batch * d  # two embedding rows per token
    kv_bytes = batch * (context + 1) * PagedLatentCache.bytes_per_token(config, dtype)
    # FLOPs per token: every GEMM above (each token uses its top_k experts, not all the routed ones read),
    # then absorbed attention: fold W_k into q, score [c | k_rope] entries, mix latents, expand with W_v.
    # k_proj_u and v_proj_u are read but, absorbed, never applied as GEMMs over the token: see `attend`.
    applied = attention - lat * h * n - lat * h * dh
    gemm_elems = config.num_hidden_layers * (
        applied + router + expert * (config.num_shared_experts + config.top_k_experts)) + head
    attend = config.num_hidden_layers * 2 * h * (n * lat + (context + 1) * (lat + r) + (context + 1) * lat + lat * dh)
    flops = batch * (2 * gemm_elems + attend)
    return weight_elems * elem + kv_bytes, flops


def step_bound(nbytes: float, flops: float, machine: Machine) -> float:
    """Seconds a step that reads `nbytes` and computes `flops` takes at least on `machine`."""
    return max(nbytes / machine.read_bandwidth, flops / machine.gemm_flops)


def serving_flops_per_output_token(config: ModelConfig, prompt_len: int, output_len: int,
                                   dtype: torch.dtype) -> float:
    """FLOPs the server spends per generated token when every request prefills `prompt_len` fresh tokens and
    decodes `output_len`: a prompt token costs what a decode token does, less the lm_head (only the last prompt
    token gets logits). A lower bound on the work at any concurrency; batching saves bytes, not FLOPs."""
    per_token = decode_cost(config, 1, prompt_len + output_len // 2, dtype)[1]
    head = 2 * config.vocab_size * config.hidden_size
    return (prompt_len * (per_token - head) + head + output_len * per_token) / output_len


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Print the table; return the machine figures and one row per batch (for bench/run_all.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=256, help="cached tokens per sequence")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (GEMM peak, then every batch's step)")
    parser.add_argument("--no-measure", action="store_true", help="print the bounds only, without running the model")
    parser.add_argument("--prompt-len", type=int, default=64, help="for the serving bound")
    parser.add_argument("--output-len", type=int, default=64, help="for the serving bound")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = ModelConfig()
    batches = [int(b) for b in args.batches.split(",")]

    print(f"threads={torch.get_num_threads()}")
    peak = {name: measure_gemm(dt) for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    if args.dtype not in peak:
        peak[args.dtype] = measure_gemm(dtype)
    bandwidth = measure_read_bandwidth()
    for name, flops in peak.items():
        print(f"GEMM 2048^3 {name}: {flops / 1e9:7.1f} GFLOP/s")
    print(f"memory read bandwidth: {bandwidth / 1e9:7.1f} GB/s")

    model = cache = None
    if not args.no_measure:
        model = load_seed_model(dtype)
        cache = make_cache(config, dtype, max(batches), args.context, prompt=0)
    # This shared host's speed drifts by tens of percent within minutes, the GEMM peak with it: each round
    # measures the peak again right before the steps it bounds, and a step is compared with its own round's.
    rounds: list[tuple[Machine, dict[int, float]]] = []
    if model is not None and cache is not None:
        for r in range(args.rounds):
            machine = Machine(gemm_flops=peak[args.dtype] if r == 0 else measure_gemm(dtype), read_bandwidth=bandwidth)
            steps = {b: best_time(decode_step(model, cache, b, args.context), args.repeats) for b in batches}
            rounds.append((machine, steps))
            print(f"round {r + 1}: GEMM peak {machine.gemm_flops / 1e9:.1f} GFLOP/s, steps "
                  + ", ".join(f"b{b} {t * 1e3:.1f} ms" for b, t in steps.items()), flush=True)

    rows: list[dict[str, object]] = []
    print(f"\ndecode step, {args.dtype}, {args.context} cached tokens per sequence"
          + (f"; the round with the median share of {len(rounds)}" if rounds else ""))
    print(f"{'batch':>5} {'MB read':>9} {'GFLOP':>7} {'bw bound':>9} {'flop bound':>10} {'bound':>8} "
          f"{'bound tok/s':>11} {'measured':>9} {'tok/s':>7} {'of bound':>8}  every round")
    for batch in batches:
        nbytes, flops = decode_cost(config, batch, args.context, dtype)

        machine = Machine(gemm_flops=peak[args.dtype], read_bandwidth=bandwidth)
        row: dict[str, object] = {"batch": batch}
        measured = None
        shares: list[float] = []
        if rounds:
            shares = [step_bound(nbytes, flops, m) / steps[batch] for m, steps in rounds]
            machine, steps = rounds[sorted(range(len(rounds)), key=shares.__getitem__)[len(rounds) // 2]]
            measured = steps[batch]
        bound = step_bound(nbytes, flops, machine)
        line = (f"{batch:5d} {nbytes / 1e6:9.0f} {flops / 1e9:7.1f} {nbytes / machine.read_bandwidth * 1e3:7.1f}ms "
                f"{flops / machine.gemm_flops * 1e3:8.1f}ms {bound * 1e3:6.1f}ms {batch / bound:11.0f}")
        row.update(bound_ms=bound * 1e3, bound_tok_per_s=batch / bound)
        if measured is not None:
            line += (f" {measured * 1e3:7.1f}ms {batch / measured:7.1f} {bound / measured:8.0%}  "
                     + " ".join(f"{share:.0%}" for share in shares))
            row.update(measured_ms=measured * 1e3, measured_tok_per_s=batch / measured, share_of_bound_rounds=shares)
        rows.append(row)
        print(line)
    serving = peak[args.dtype] / serving_flops_per_output_token(config, args.prompt_len, args.output_len, dtype)
    print(f"\nserving bound, {args.prompt_len}-token prompts (all prefilled) and {args.output_len}-token outputs: "
          f"{serving:.0f} output tok/s at any concurrency (FLOPs at the GEMM peak)")
    return {"gemm_flops": peak, "read_bandwidth": bandwidth, "decode": rows, "serving_bound_tok_per_s": serving}


if __name__ == "__main__":
    main()
