// GEMM out = x . w^T with float32 activations and bfloat16 or float32 weights [N, K] as stored (no repacked
// layout), accumulating in float32 with FMA. bfloat16 weights stay bfloat16 in memory (half the bytes, which
// decides decode speed) and are widened in registers. Two kernels, chosen by the row count M:
//
// - M < kOuterMinRows (decode at small batch, memory-bound): inner products, a register tile of up to 4 rows
//   x 3-4 weight rows read once for all of them, with software prefetch of the next tile's weight rows (each
//   row is short, 1.5-3 KB, too short for the hardware prefetcher to ramp up on its own) and two accumulators
//   per row at M=1 (FMA latency).
// - M >= kOuterMinRows (large batch, prefill: FLOP-bound): outer products. x is packed once per call into
//   column panels xp [M/kMT][K][kMT] (kMT = 2 vectors of rows, zero padded); a tile of kNW weight rows x kKC
//   features is widened once into an L1 buffer and reused for every row panel; the micro-kernel broadcasts one
//   weight and FMAs it into kMT rows: kNW x 2 vector accumulators, no horizontal sums.
//
// Shapes: M rows of input, K input features, N output features.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace customllm {
namespace gemm_detail {

constexpr int64_t kRowBlock = 64;  // input rows per pass over the weight: their float32 copy stays in L2

inline vfloat load_w(const float* p) { return load(p); }
inline vfloat load_w(const uint16_t* p) { return load_bf16(p); }
inline float scalar_w(float v) { return v; }
inline float scalar_w(uint16_t v) { return bf16_to_float(v); }

// out[m][n] = x[m] . w[n] for a tile of MR rows and NR weight rows; x float32 [*, K], w [*, K]. `next` is the
// next tile's first weight row, prefetched while this one runs (a prefetch never faults, even past the end).
template <int MR, int NR, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo, const W* next) {
  constexpr int kU = MR == 1 ? 2 : 1;  // independent accumulators per (row, weight row)
  constexpr int64_t kStep = kU * kLanes;
  constexpr int64_t kLine = 64 / sizeof(W);  // elements per cache line
  const int64_t kv = K / kStep * kStep;
  vfloat acc[MR][NR][kU] = {};
  for (int64_t k = 0; k < kv; k += kStep) {
    if (k % kLine < kStep)
      for (int j = 0; j < NR; ++j) __builtin_prefetch(next + j * K + k, 0, 0);
    for (int u = 0; u < kU; ++u) {
      vfloat wk[NR];
      for (int j = 0; j < NR; ++j) wk[j] = load_w(w + j * K + k + u * kLanes);
      for (int i = 0; i < MR; ++i) {
        const vfloat xk = load(x + i * ldx + k + u * kLanes);
        for (int j = 0; j < NR; ++j) acc[i][j][u] += xk * wk[j];
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      vfloat a = acc[i][j][0];
      for (int u = 1; u < kU; ++u) a += acc[i][j][u];
      float s = hsum(a);
      for (int64_t k = kv; k < K; ++k) s += x[i * ldx + k] * scalar_w(w[j * K + k]);
      out[i * ldo + j] = s;
    }
  }
}

template <int MR, typename W>
void tile_rows(int nr, const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo,
               const W* next) {
  switch (nr) {
    case 4: tile<MR, 4, W>(x, ldx, w, K, out, ldo, next); break;
    case 3: tile<MR, 3, W>(x, ldx, w, K, out, ldo, next); break;
    case 2: tile<MR, 2, W>(x, ldx, w, K, out, ldo, next); break;
    default: tile<MR, 1, W>(x, ldx, w, K, out, ldo, next); break;
  }
}

template <typename W>
void tile_any(int mr, int nr, const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo,
              const W* next) {
  switch (mr) {
    case 4: tile_rows<4, W>(nr, x, ldx, w, K, out, ldo, next); break;
    case 3: tile_rows<3, W>(nr, x, ldx, w, K, out, ldo, next); break;
    case 2: tile_rows<2, W>(nr, x, ldx, w, K, out, ldo, next); break;
    default: tile_rows<1, W>(nr, x, ldx, w, K, out, ldo, next); break;
  }
}

// kMR x kNR tiles; `kAhead` tiles ahead are prefetched (measured: 1 and 2 alike, none 20-30% slower at M=1).
template <typename W, int kMR, int kNR, int kAhead = 1>
void gemm_inner(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* out, int64_t ldo) {
  // One contiguous range of whole register tiles per thread: each thread streams its own part of the weight.
  const int64_t tiles = (N + kNR - 1) / kNR;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kNR, n1 = std::min(N, end * kNR);
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t n = n0; n < n1; n += kNR) {
        const int nr = static_cast<int>(std::min<int64_t>(kNR, n1 - n));
        for (int64_t m = m0; m < m1; m += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
          // Prefetch the next tile's weight rows only on the first row tile: later ones find them in L1.
          const W* next = w + (m == m0 ? n + kAhead * kNR : n) * K;
          tile_any(mr, nr, x + m * K, K, w + n * K, K, out + m * ldo + n, ldo, next);
        }
      }
    }
  });
}

// ---- outer products ----
constexpr int kNW = 6;                // weight rows per micro tile: kNW x 2 accumulators (12 of 16 AVX2 registers)
constexpr int kMT = 2 * kLanes;       // rows per x panel
constexpr int64_t kKC = 1024;  // features per block: the widened weight tile (24 KB) stays in L1
constexpr int64_t kMB = 128;          // rows per pass over a weight tile: their x panels (256 KB) stay in L2

// out[m0 + r][n + j] (+)= sum_k xp[k][r] * wr[j][k] for r < rows, j < nw; MV vectors of rows (MV * kLanes).
template <int MV>
void micro(const float* xp, const float* const* wr, int64_t kc, float* out, int64_t ldo, int64_t rows, int nw,
           bool accumulate) {
  vfloat acc[kNW][MV] = {};
  for (int64_t k = 0; k < kc; ++k) {
    vfloat xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = load(xp + k * kMT + v * kLanes);
    for (int j = 0; j < kNW; ++j) {
      const vfloat b = splat(wr[j][k]);
      for (int v = 0; v < MV; ++v) acc[j][v] += b * xv[v];
    }
  }
  // Row by row: each output row's cache line is touched once (rows are ldo apart, often a multiple of 4 KB,
  // so column-wise stores would keep evicting each other from L1).
  float col[kNW][MV * kLanes];
  for (int j = 0; j < kNW; ++j)
    for (int v = 0; v < MV; ++v) store(col[j] + v * kLanes, acc[j][v]);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * ldo;
    if (accumulate)
      for (int j = 0; j < nw; ++j) o[j] += col[j][r];
    else
      for (int j = 0; j < nw; ++j) o[j] = col[j][r];
  }
}

template <typename W, int64_t KC = kKC>
void gemm_outer(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* out, int64_t ldo) {
  // Pack x [M, K] into panels xp[p][k][r] = x[p * kMT + r][k] (zero past M).
  const int64_t panels = (M + kMT - 1) / kMT;
  // 64-byte aligned: each feature's kMT rows are one or two whole cache lines.
  std::vector<float> xbuf(static_cast<size_t>(panels * K * kMT + 16));
  float* const xp = xbuf.data() + (16 - reinterpret_cast<uintptr_t>(xbuf.data()) / 4 % 16) % 16;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = xp + p * K * kMT;
      const int64_t rows = std::min<int64_t>(kMT, M - p * kMT);
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = x + (p * kMT + r) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * kMT + r] = src[k];
      }
      for (int64_t r = rows; r < kMT; ++r)
        for (int64_t k = 0; k < K; ++k) dst[k * kMT + r] = 0.f;
    }
  });
  // Balanced feature blocks of at most kKC.
  const int64_t kblocks = (K + KC - 1) / KC, kc_max = (K + kblocks - 1) / kblocks;
  const int64_t tiles = (N + kNW - 1) / kNW;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(static_cast<size_t>(kNW * kc_max), 0.f);  // widened bf16 tile / zero rows
    const int64_t n0 = begin * kNW, n1 = std::min(N, end * kNW);
    for (int64_t mb = 0; mb < M; mb += kMB) {
      const int64_t mb1 = std::min(M, mb + kMB);
      for (int64_t n = n0; n < n1; n += kNW) {
        const int nw = static_cast<int>(std::min<int64_t>(kNW, n1 - n));
        for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
          const int64_t kc = std::min(kc_max, K - k0);
          const float* wr[kNW];
          for (int j = 0; j < kNW; ++j) {
            float* row = wbuf.data() + j * kc_max;
            if (j >= nw) {
              std::fill_n(row, kc, 0.f);
              wr[j] = row;
            } else if constexpr (std::is_same_v<W, float>) {
              wr[j] = w + (n + j) * K + k0;
            } else {
              widen_bf16(w + (n + j) * K + k0, row, kc);
              wr[j] = row;
            }
          }
          for (int64_t m = mb; m < mb1; m += kMT) {
            const int64_t rows = std::min<int64_t>(kMT, mb1 - m);
            const float* panel = xp + (m / kMT) * K * kMT + k0 * kMT;
            if (rows > kLanes)
              micro<2>(panel, wr, kc, out + m * ldo + n, ldo, rows, nw, k0 > 0);
            else
              micro<1>(panel, wr, kc, out + m * ldo + n, ldo, rows, nw, k0 > 0);
          }
        }
      }
    }
  });
}

}  // namespace gemm_detail

constexpr int64_t kOuterMinRows = 16;  // measured: inner products win at M = 8, outer products at 16

// x [M, K] float32, w [N, K] -> out [M, N] float32 (row stride ldo). Parallel over N (call it outside any
// parallel region).
template <typename W>
void gemm(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* out, int64_t ldo) {
  // Measured tile shapes: 1x4 (two accumulators each) streams best at M <= 2; 4x3 (12 accumulators, 16 ymm
  // registers with the weights and x) beats 4x4, which spills on AVX2, from M = 3.
  if (M >= kOuterMinRows)
    gemm_detail::gemm_outer(x, M, K, w, N, out, ldo);
  else if (M <= 2)
    gemm_detail::gemm_inner<W, 2, 4>(x, M, K, w, N, out, ldo);
  else
    gemm_detail::gemm_inner<W, 4, 3>(x, M, K, w, N, out, ldo);
}

}  // namespace customllm
