"""A/B of the fused MLA decode kernel (model/csrc/mla_decode.cpp) against an older revision of it, in one process.

Usage: python bench/mla_decode_ab.py [--base main] [--batches 1,8,64] [--context 256] [--dtype bfloat16]
                                     [--rounds 20] [--threads N] [--copies 3] [--clock wall|cpu]

Both versions are compiled into one throwaway extension, each in its own namespace and op library
(torch.ops.customllm_old / customllm_new), so every figure comes from the same process. The variants alternate
within each round and each figure is the best call over all rounds: a shared machine's drift hits both alike.
Seed-model heads (12 heads, latent 192, rope 32, blocks of 16); the cache rotates over `--copies` copies so that,
as over the model's 30 layers, it comes from DRAM rather than the last-level cache. GFLOP/s counts the score
(2 (L + R)) and the mix (2 L) per head and context token. Both outputs are checked against the torch oracle.
`--clock cpu --threads 1` times the calling thread's CPU time: on a machine shared with other work, a niced run
is preempted often, and wall time then measures the neighbours as much as the kernel. Random inputs; not a test
(the tests are tests/model/ops/test_mla_decode.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "model" / "csrc"
HEADS, LATENT, ROPE, BLOCK = 12, 192, 32, 16


_FILES = ("mla_decode.cpp", "mla_decode_tiles.h", "vec.h")  # the kernel and the headers it includes


def _renamed(text: str, suffix: str) -> str:
    """One revision's file in namespace and op library customllm_<suffix>, including its own headers."""
    text = (text.replace("namespace customllm {", f"namespace customllm_{suffix} {{")
            .replace("TORCH_LIBRARY_FRAGMENT(customllm,", f"TORCH_LIBRARY_FRAGMENT(customllm_{suffix},"))
    for name in _FILES[1:]:
        text = text.replace(f'"{name}"', f'"{name.replace(".h", f"_{suffix}.h")}"')
    return text


def build(base: str) -> None:
    """Register torch.ops.customllm_old.mla_decode (the kernel at `base`) and customllm_new (the working tree's)."""
    tmp = Path(tempfile.mkdtemp(prefix="mla_decode_ab_"))
    for name in _FILES:
        stem, ext = name.split(".")
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{base}:model/csrc/{name}"], capture_output=True,
                             text=True)
        if old.returncode == 0:  # a header the old revision lacks is not included by it either
            (tmp / f"{stem}_old.{ext}").write_text(_renamed(old.stdout, "old"))
        if (CSRC / name).exists():
            (tmp / f"{stem}_new.{ext}").write_text(_renamed((CSRC / name).read_text(), "new"))
    from model.ops.cpu_extension import _COMMON_FLAGS, _ISA_FLAGS, detect_isa

    isa = detect_isa()
    if isa is None:
        raise SystemExit("this CPU lacks AVX2/FMA: no extension to compare")
    cpp_extension.load(name="mla_decode_ab", sources=[str(tmp / "mla_decode_old.cpp"), str(tmp / "mla_decode_new.cpp")],
                       build_directory=str(tmp), extra_cflags=_COMMON_FLAGS + _ISA_FLAGS[isa],
                       extra_ldflags=["-fopenmp"], is_python_module=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision of the old kernel")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--copies", type=int, default=3, help="cache copies rotated over (DRAM-resident)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time (with --threads 1: preemption does not count)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build(args.base)
    from model.metadata import AttentionMetadata
    from model.ops.mla_decode import TorchMLADecode

    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("--clock cpu times the calling thread only: use it with --threads 1")
    dtype = getattr(torch, args.dtype)
    variants = {"old": torch.ops.customllm_old.mla_decode, "new": torch.ops.customllm_new.mla_decode}
    print(f"old = mla_decode.cpp at {args.base}, new = working tree; {args.dtype} cache, context {args.context}, "
          f"threads={torch.get_num_threads()}, {args.clock} clock, best of {args.rounds} alternating rounds",
          flush=True)
    g = torch.Generator().manual_seed(0)
    scale = (LATENT + ROPE) ** -0.5
    for b in (int(v) for v in args.batches.split(",")):
        nblocks = -(-args.context // BLOCK)
        lens = [args.context] * b
        ids = (torch.randperm(b * nblocks, generator=g) + 1).view(b, nblocks).tolist()
        meta = AttentionMetadata.build([1] * b, lens, ids, BLOCK)
        caches = [torch.randn(b * nblocks + 1, BLOCK, LATENT + HEADS * ROPE, generator=g).to(dtype)
                  for _ in range(args.copies)]
        q_lat = torch.randn(b, HEADS, LATENT, generator=g)
        q_rope = torch.randn(b, HEADS, ROPE, generator=g)
        tables, ctx = meta.decode_block_tables, meta.decode_context_lens
        want = TorchMLADecode().mix(q_lat, q_rope, caches[0].float(), meta, scale)
        for fn in variants.values():
            got = fn(q_lat, q_rope, caches[0], tables, ctx, scale, 0)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for label, fn in variants.items():
                for cache in caches:
                    start = clock()
                    fn(q_lat, q_rope, cache, tables, ctx, scale, 0)
                    best[label] = min(best[label], clock() - start)
        flop = 2 * b * args.context * HEADS * (2 * LATENT + ROPE)
        print(f"  B={b:<3d}" + "  ".join(f"{label} {s * 1e3:7.3f} ms {flop / s / 1e9:5.1f} GF/s"
                                         for label, s in best.items())
              + f"   old/new time {best['old'] / best['new']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
