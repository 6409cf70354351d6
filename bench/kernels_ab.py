"""A/B of the CPU kernels against the torch paths in one process: seed-model decode steps, lever by lever.

Usage: python bench/kernels_ab.py [--dtype bfloat16] [--batches 1,8,64] [--context 256] [--rounds 2]
                                  [--threads N] [--variants base,linear,linear+mla,all,all+layer]

Variants: base = plain linear, torch MLA decode, torch experts (the paths before the extension);
linear = the auto linear backend (the bf16 kernel where oneDNN has no bf16 GEMM); linear+mla = also the
fused MLA decode kernel; all = also the fused MoE experts kernel, the layers run from Python; all+layer = also
one extension call per decoder layer (model/ops/decode_layer.py). The variants alternate within each round
(two timed steps each) and each figure is the best and the median step over all rounds: a shared machine's
drift hits every variant alike.
Each variant is its own model (weights are processed once per backend choice); random weights; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as `python bench/kernels_ab.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_step import decode_step, load_seed_model, make_cache
from model import ModelConfig
from model.ops import cpu_extension

# variant -> (linear, attention, moe, decode layer) backend names
VARIANTS = {
    "base": ("plain", "torch", "torch", "modules"),
    "linear": ("auto", "torch", "torch", "modules"),
    "linear+mla": ("auto", "cpp", "torch", "modules"),
    "all": ("auto", "cpp", "cpp", "modules"),
    "all+layer": ("auto", "cpp", "cpp", "auto"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds, two timed steps each")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--variants", default="base,linear,linear+mla,all,all+layer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not cpu_extension.load():
        raise SystemExit("the CPU extension is not available here (see the log): nothing to compare")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    batches = [int(b) for b in args.batches.split(",")]
    models = {name: load_seed_model(dtype, linear, attention=attention, moe=moe, decode_layer=layer)
              for name, (linear, attention, moe, layer) in VARIANTS.items() if name in names}
    cache = make_cache(ModelConfig(), dtype, max(batches), args.context, prompt=0)
    print(f"{args.dtype} threads={torch.get_num_threads()} context={args.context}, best / median step of "
          f"{args.rounds} alternating rounds x 2")
    for batch in batches:
        steps = {name: decode_step(model, cache, batch, args.context) for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                step = steps[name]
                step()  # warm-up after the switch
                for _ in range(2):
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
        print(f"  b{batch:<3d} " + "  ".join(f"{n} {min(t) * 1e3:6.1f} / {statistics.median(t) * 1e3:6.1f} ms"
                                             for n, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
