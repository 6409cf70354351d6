"""`--quantization int8` against the float model: logit error next to the float32 reference, and step time.

Error: the seed model with random weights (seeded), one prompt of `--prompt-len` random tokens prefilled, the
logits of every position compared with float32's: max |diff|, the same relative to float32's logit spread
(std), and how often the argmax agrees. Speed: a decode step at each batch, every variant timed in turn
within each round and the best of the rounds kept (this machine is shared; alternating keeps the drift out
of the comparison).

Usage: python bench/quantization.py [--batches 1,64] [--context 64] [--prompt-len 64] [--rounds 3] [--json out]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Run as `python bench/quantization.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_step import decode_step, make_cache
from model import AttentionMetadata, CustomLLM, ModelConfig, PagedLatentCache
from server.startup import load_for_serving

VARIANTS = (("float32", torch.float32, "none"), ("bfloat16", torch.bfloat16, "none"),
            ("bfloat16+int8", torch.bfloat16, "int8"))


def prompt_logits(model: CustomLLM, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [P, V] of every prompt position after one prefill."""
    n = ids.shape[0]
    cache = PagedLatentCache(model.config, -(-n // 16) + 1, 16, dtype)
    meta = AttentionMetadata.build([n], [n], [list(range(1, 1 + -(-n // 16)))], 16)
    return model.compute_logits(model(ids, torch.arange(n), meta, cache.layers)).float()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    ids = torch.randint(100, ModelConfig().vocab_size, (args.prompt_len,))

    models: dict[str, CustomLLM] = {}
    logits: dict[str, torch.Tensor] = {}
    for name, dtype, quant in VARIANTS:
        start = time.perf_counter()
        models[name] = load_for_serving(None, dtype, torch.device("cpu"), 0, quant)
        logits[name] = prompt_logits(models[name], dtype, ids)
        print(f"{name}: loaded on backend {models[name].backends.linear.name} in {time.perf_counter() - start:.1f} s",
              flush=True)
    reference = logits["float32"]
    spread = reference.std().item()
    errors = {}
    for name in logits:
        if name == "float32":
            continue
        diff = (logits[name] - reference).abs()
        errors[name] = {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                        "max_rel_to_std": diff.max().item() / spread,
                        "argmax_agreement": (logits[name].argmax(-1) == reference.argmax(-1)).float().mean().item()}
        print(f"logits vs float32, {name}: max |diff| {errors[name]['max_abs']:.4f} "
              f"({errors[name]['max_rel_to_std']:.1%} of the logit std {spread:.3f}), mean "
              f"{errors[name]['mean_abs']:.4f}, argmax agrees at {errors[name]['argmax_agreement']:.0%} of "
              f"{args.prompt_len} positions", flush=True)
    del models["float32"]  # speed: bf16 against bf16+int8 (float32 is the accuracy reference only)

    steps = {}
    for name, model in models.items():
        dtype = next(d for n, d, _ in VARIANTS if n == name)
        for batch in batches:
            cache = make_cache(model.config, dtype, batch, args.context, 0)
            steps[(name, batch)] = decode_step(model, cache, batch, args.context)
            steps[(name, batch)]()  # warm-up
    best = {key: float("inf") for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():  # every variant once per round: drift hits all alike
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                best[key] = min(best[key], time.perf_counter() - start)
    speed = {}
    for batch in batches:
        row = {name: best[(name, batch)] for name in models}
        speed[str(batch)] = row
        base = row["bfloat16"]
        print(f"decode step, batch {batch}, context {args.context}: "
              + ", ".join(f"{n} {t * 1e3:.1f} ms ({base / t:.2f}x)" for n, t in row.items()), flush=True)
    report = {"prompt_len": args.prompt_len, "context": args.context, "logit_std_float32": spread,
              "logit_error_vs_float32": errors, "decode_step_s": speed,
              "backends": {n: m.backends.linear.name for n, m in models.items() if m.backends}}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
