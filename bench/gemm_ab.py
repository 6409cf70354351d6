"""A/B of the extension's bfloat16 GEMM (model/csrc/gemm.h) against an older revision of it, in one process.

Usage: python bench/gemm_ab.py [--base main] [--rounds 20] [--threads N] [--cases small,large]

`--base` is any revision with pack_panels (from 26afa9b); `--base bf169fd` is the last one with panels of 4
weight rows stored chunk by chunk. Each variant gets the weight packed by its own pack_panels.
GEMM_AB_ROWS=1,4 picks the decode row counts. Both versions are compiled into one throwaway extension (the old
one under another namespace), so every figure comes from the same process. The variants alternate within each
round and each figure is the best call over all rounds: a shared machine's drift hits both alike. Decode
(M <= 8) is memory-bound: its weights rotate over enough copies (> 2x L3) that they come from DRAM, as the
model's 30 layers do; the figure is weight GB/s. Larger M is FLOP-bound: GFLOP/s. The MoE experts' token
groups at batch 64 have 10-30 rows. Random inputs; not a test (the tests are tests/model/ops/).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "model" / "csrc"

_SOURCE = r"""
#include <torch/extension.h>
#include "gemm.h"
#include "gemm_old.h"

using W = const uint16_t*;
W wptr(const at::Tensor& w) { return reinterpret_cast<W>(w.data_ptr<at::BFloat16>()); }
// w [N, K] bfloat16 dense -> the same shape in a variant's layout.
template <typename Pack>
at::Tensor pack(const at::Tensor& w, Pack fn) {
  auto packed = at::empty_like(w);
  fn(wptr(w), w.size(0), w.size(1), reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>()));
  return packed;
}
at::Tensor pack_old(const at::Tensor& w) { return pack(w, customllm_old::pack_panels); }
at::Tensor pack_new(const at::Tensor& w) { return pack(w, customllm::pack_panels); }
// out [M, N] = x [M, K] float32 . w [N, K] bfloat16 ^T, by each variant on its own packed weight.
void gemm_old(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  customllm_old::gemm(x.data_ptr<float>(), x.size(0), x.size(1), wptr(w), w.size(0), out.data_ptr<float>(),
                      w.size(0));
}
void gemm_new(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  customllm::gemm(x.data_ptr<float>(), x.size(0), x.size(1), wptr(w), w.size(0), out.data_ptr<float>(), w.size(0));
}
"""


def build(base: str) -> object:
    """The extension with gemm_old (gemm.h at `base`) and gemm_new (the working tree's gemm.h)."""
    tmp = Path(tempfile.mkdtemp(prefix="gemm_ab_"))
    for header in ("gemm.h", "vec.h"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{base}:model/csrc/{header}"], check=True,
                              capture_output=True, text=True).stdout
        # The old headers in their own namespace, the old gemm.h on the old vec.h.
        text = text.replace("namespace customllm {", "namespace customllm_old {").replace('"vec.h"', '"vec_old.h"')
        (tmp / header.replace(".h", "_old.h")).write_text(text)
    from model.ops.cpu_extension import _COMMON_FLAGS, _ISA_FLAGS, detect_isa

    isa = detect_isa()
    if isa is None:
        raise SystemExit("this CPU lacks AVX2/FMA: no extension to compare")
    return cpp_extension.load_inline(
        name="gemm_ab", cpp_sources=[_SOURCE],
        functions=["gemm_old", "gemm_new", "pack_old", "pack_new"],
        build_directory=str(tmp),
        extra_cflags=_COMMON_FLAGS + _ISA_FLAGS[isa], extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(CSRC), str(tmp)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision of the old gemm.h")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--cases", default="small,large")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = build(args.base)
    names = ["old", "new"]
    variants = {name: getattr(ext, f"gemm_{name}") for name in names}
    packers = {name: getattr(ext, f"pack_{name}") for name in names}
    cases: list[tuple[str, int, int, int, int]] = []  # (name, M, N, K, copies)
    if "small" in args.cases:
        for m in (int(v) for v in os.environ.get("GEMM_AB_ROWS", "1,2,4,8").split(",")):
            cases.append((f"lm_head M={m}", m, 49152, 768, 1))
            # Expert gate|up [3072, 768] and down [768, 1536]: 8 + 8 copies of 4.7 / 2.4 MB rotate past L3.
            cases.append((f"gate_up M={m}", m, 3072, 768, 16))
            cases.append((f"down M={m}", m, 768, 1536, 24))
    if "large" in args.cases:
        for m in (13, 18, 25, 32, 64):
            cases.append((f"gate_up M={m}", m, 3072, 768, 8))
            cases.append((f"down M={m}", m, 768, 1536, 12))
        cases.append(("2048^3", 2048, 2048, 2048, 1))
    print(f"old = gemm.h at {args.base}, new = working tree; threads={torch.get_num_threads()}, best of "
          f"{args.rounds} alternating rounds")
    g = torch.Generator().manual_seed(0)
    for name, m, n, k, copies in cases:
        ws = [torch.randn(n, k, generator=g).bfloat16() for _ in range(copies)]
        packed = {label: [pack(w) for w in ws] for label, pack in packers.items()}
        x = torch.randn(m, k, generator=g)
        out = torch.empty(m, n)
        want = torch.nn.functional.linear(x, ws[0].float())
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for label, fn in variants.items():
                for w in packed[label]:
                    start = time.perf_counter()
                    fn(x, w, out)
                    best[label] = min(best[label], time.perf_counter() - start)
        for label, fn in variants.items():
            fn(x, packed[label][0], out)
            torch.testing.assert_close(out, want, atol=1e-3 * float(want.abs().max()), rtol=0)
        gbs = {label: n * k * 2 / s / 1e9 for label, s in best.items()}
        gfs = {label: 2 * m * n * k / s / 1e9 for label, s in best.items()}
        print(f"  {name:<16s}" + "  ".join(
            f"{label} {best[label] * 1e6:8.0f} us {gbs[label]:4.1f} GB/s {gfs[label]:5.1f} GF/s"
            for label in variants) + f"   {names[0]}/{names[-1]} time {best[names[0]] / best[names[-1]]:.2f}x",
            flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
