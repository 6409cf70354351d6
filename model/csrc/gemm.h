// GEMM out = x . w^T with float32 activations and bfloat16 or float32 weights [N, K], accumulating in float32
// with FMA. Shapes: M rows of input, K input features, N output features.
//
// bfloat16 weights (cpp-bf16 linear, cpp MoE experts) stay bfloat16 in memory (half the bytes, which decides
// decode speed) and are widened in registers. They are stored as PANELS (pack_panels, once after loading):
// groups of kNR = 2 vectors of consecutive output features, feature-major (for each input feature k, the panel's
// kNR weights in a row); the last panel holds the N % kNR remaining outputs, narrower. One kernel for every M: a
// register tile of up to kMR = 6 input rows broadcasts one input value into the panel's two weight vectors (12
// accumulators fit AVX2's 16 registers) over the whole K: no horizontal sums, no K tails, each weight vector
// widened once per 6 rows. Each thread streams one contiguous range of panels, which the prefetcher follows.
// (What this replaced, and by how much: docs/performance.md.)
//
// float32 weights (the MoE experts of a float32 model) are dense rows, with two kernels chosen by M:
// - M < kOuterMinRows: inner products, a register tile of up to 3 input rows x 4 weight rows, with software
//   prefetch ahead of the weight rows.
// - M >= kOuterMinRows: outer products. x is packed once per call into column panels xp [M/kMT][K][kMT]
//   (kMT = 2 vectors of rows, zero padded); the micro-kernel broadcasts one weight and FMAs it into kMT rows:
//   kNW x 2 vector accumulators, no horizontal sums.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace customllm {
namespace gemm_detail {

constexpr int64_t kAhead = 512;  // weight elements prefetched ahead of the loads

// ---- bfloat16 panels ----
constexpr int kNR = 2 * kLanes;        // output features per panel
constexpr int kMR = 6;                 // input rows per register tile
constexpr int64_t kPanelRows = 120;    // input rows per pass over a thread's panels: their float32 copy stays in L2

// out[i][j] = sum_k x[i][k] * wp[k][j] for i < MR, j < kNR: one whole panel wp [K][kNR].
template <int MR>
void panel_tile(const float* x, int64_t ldx, const uint16_t* wp, int64_t K, float* out, int64_t ldo) {
  vfloat acc[MR][2] = {};
  for (int64_t k = 0; k < K; ++k, wp += kNR) {
    __builtin_prefetch(wp + kAhead, 0, 3);
    const vfloat w0 = load_bf16(wp), w1 = load_bf16(wp + kLanes);
    for (int i = 0; i < MR; ++i) {
      const vfloat b = splat(x[i * ldx + k]);
      acc[i][0] += b * w0;
      acc[i][1] += b * w1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    store(out + i * ldo, acc[i][0]);
    store(out + i * ldo + kLanes, acc[i][1]);
  }
}

inline void panel_tile_any(int mr, const float* x, int64_t ldx, const uint16_t* wp, int64_t K, float* out,
                           int64_t ldo) {
  static_assert(kMR == 6, "one case per row count");
  switch (mr) {
    case 6: panel_tile<6>(x, ldx, wp, K, out, ldo); break;
    case 5: panel_tile<5>(x, ldx, wp, K, out, ldo); break;
    case 4: panel_tile<4>(x, ldx, wp, K, out, ldo); break;
    case 3: panel_tile<3>(x, ldx, wp, K, out, ldo); break;
    case 2: panel_tile<2>(x, ldx, wp, K, out, ldo); break;
    default: panel_tile<1>(x, ldx, wp, K, out, ldo); break;
  }
}

inline void gemm_panels(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* out,
                        int64_t ldo) {
  const int64_t panels = (N + kNR - 1) / kNR;
  // Panels per chunk: about 128 KB of weight, which stays in L2 while every row tile passes over it. Row tile by
  // row tile, each output row is then written in runs of a chunk's width: panel by panel, a pass of many rows
  // would write one line of every row, and rows ldo apart (often a multiple of 4 KB: lm_head's 196 KB) fall
  // into the same cache sets and keep evicting each other.
  const int64_t chunk = std::max<int64_t>(1, (128 << 10) / (K * kNR * 2));
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> padded;  // the narrow last panel, zero padded to kNR outputs (if this thread has it)
    float narrow_out[kMR * kNR];
    for (int64_t m0 = 0; m0 < M; m0 += kPanelRows) {
      const int64_t m1 = std::min(M, m0 + kPanelRows);
      for (int64_t c0 = begin; c0 < end; c0 += chunk) {
        const int64_t c1 = std::min(end, c0 + chunk);
        for (int64_t m = m0; m < m1; m += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
          for (int64_t p = c0; p < c1; ++p) {
            const int64_t n0 = p * kNR;
            const int nr = static_cast<int>(std::min<int64_t>(kNR, N - n0));
            const uint16_t* wp = w + n0 * K;  // every panel before it is whole
            if (nr == kNR) {
              panel_tile_any(mr, x + m * K, K, wp, K, out + m * ldo + n0, ldo);
              continue;
            }
            if (padded.empty()) {
              padded.assign(K * kNR, 0);
              for (int64_t k = 0; k < K; ++k) std::copy_n(wp + k * nr, nr, padded.data() + k * kNR);
            }
            panel_tile_any(mr, x + m * K, K, padded.data(), K, narrow_out, kNR);
            for (int i = 0; i < mr; ++i) std::copy_n(narrow_out + i * kNR, nr, out + (m + i) * ldo + n0);
          }
        }
      }
    }
  });
}

// ---- float32 dense rows: inner products ----
constexpr int kRowTile = 4;        // weight rows per register tile
constexpr int64_t kRowBlock = 64;  // input rows per pass over the weight: they stay in L2

// out[i][j] = x[i] . w[j] for MR input rows and NR weight rows (w [NR, K], rows K apart).
template <int MR, int NR>
void row_tile(const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo) {
  const int64_t kf = K / kLanes * kLanes;
  vfloat acc[MR][NR] = {};
  for (int64_t k = 0; k < kf; k += kLanes) {
    if (k % 16 == 0)  // one prefetch per cache line of each row
      for (int j = 0; j < NR; ++j) __builtin_prefetch(w + j * K + k + kAhead, 0, 3);
    vfloat xk[MR];
    for (int i = 0; i < MR; ++i) xk[i] = load(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const vfloat wk = load(w + j * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] += xk[i] * wk;
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < MR; ++i) {
      float s = hsum(acc[i][j]);
      for (int64_t k = kf; k < K; ++k) s += x[i * ldx + k] * w[j * K + k];
      out[i * ldo + j] = s;
    }
}

template <int MR>
void row_tile_rows(int rows, const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo) {
  switch (rows) {
    case 4: row_tile<MR, 4>(x, ldx, w, K, out, ldo); break;
    case 3: row_tile<MR, 3>(x, ldx, w, K, out, ldo); break;
    case 2: row_tile<MR, 2>(x, ldx, w, K, out, ldo); break;
    default: row_tile<MR, 1>(x, ldx, w, K, out, ldo); break;
  }
}

inline void row_tile_any(int mr, int rows, const float* x, int64_t ldx, const float* w, int64_t K, float* out,
                         int64_t ldo) {
  switch (mr) {
    case 3: row_tile_rows<3>(rows, x, ldx, w, K, out, ldo); break;
    case 2: row_tile_rows<2>(rows, x, ldx, w, K, out, ldo); break;
    default: row_tile_rows<1>(rows, x, ldx, w, K, out, ldo); break;
  }
}

// Register tiles of up to kMR (2 or 3) input rows x kRowTile weight rows; each thread takes one contiguous range
// of weight rows.
template <int kMR>
void gemm_inner(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out, int64_t ldo) {
  static_assert(kMR == 2 || kMR == 3, "row_tile_any dispatches 1 to 3 input rows");
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t t = begin; t < end; ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, N - t * kRowTile));
        for (int64_t m = m0; m < m1; m += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
          row_tile_any(mr, rows, x + m * K, K, w + t * kRowTile * K, K, out + m * ldo + t * kRowTile, ldo);
        }
      }
    }
  });
}

// ---- float32 dense rows: outer products ----
constexpr int kNW = 6;           // weight rows per micro tile: kNW x 2 accumulators (12 of 16 AVX2 registers)
constexpr int kMT = 2 * kLanes;  // rows per x panel
constexpr int64_t kKC = 1024;    // features per block: kNW weight rows of it (24 KB) stay in L1
constexpr int64_t kMB = 128;     // rows per pass over a weight tile: their x panels (256 KB) stay in L2

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

inline void gemm_outer(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out, int64_t ldo) {
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
  // Balanced feature blocks of at most about kKC.
  const int64_t kblocks = (K + kKC - 1) / kKC;
  const int64_t kc_max = (K + kblocks - 1) / kblocks;
  const int64_t tiles = (N + kNW - 1) / kNW;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const std::vector<float> zeros(static_cast<size_t>(kc_max), 0.f);  // the rows past N of the last tile
    const int64_t n0 = begin * kNW, n1 = std::min(N, end * kNW);
    for (int64_t mb = 0; mb < M; mb += kMB) {
      const int64_t mb1 = std::min(M, mb + kMB);
      for (int64_t n = n0; n < n1; n += kNW) {
        const int nw = static_cast<int>(std::min<int64_t>(kNW, n1 - n));
        for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
          const int64_t kc = std::min(kc_max, K - k0);
          const float* wr[kNW];
          for (int j = 0; j < kNW; ++j) wr[j] = j < nw ? w + (n + j) * K + k0 : zeros.data();
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

constexpr int64_t kOuterMinRows = 32;  // float32 weights: inner products below 32 rows, outer products from 32

// x [M, K] float32 (rows K apart), w [N, K] -> out [M, N] float32 (row stride ldo). Parallel over N (call it
// outside any parallel region). bfloat16 weights in the panel layout:
inline void gemm(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* out, int64_t ldo) {
  gemm_detail::gemm_panels(x, M, K, w, N, out, ldo);
}

// float32 weights, dense rows:
inline void gemm(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* out, int64_t ldo) {
  if (M >= kOuterMinRows)
    gemm_detail::gemm_outer(x, M, K, w, N, out, ldo);
  else if (M <= 2)
    gemm_detail::gemm_inner<2>(x, M, K, w, N, out, ldo);
  else
    gemm_detail::gemm_inner<3>(x, M, K, w, N, out, ldo);
}

// Dense bfloat16 [N, K] <-> panels (bit copies), a panel at a time.
template <bool kToPanels>
void copy_panels(const uint16_t* src, int64_t N, int64_t K, uint16_t* dst) {
  constexpr int kNR = gemm_detail::kNR;
  at::parallel_for(0, (N + kNR - 1) / kNR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kNR;
      const int64_t nr = std::min<int64_t>(kNR, N - n0);
      const int64_t base = n0 * K;  // the panel's first element: its [nr, K] rows dense, [K, nr] packed
      // A transpose in blocks of 64 features: a block's nr x 64 values stay in L1 on both sides.
      for (int64_t k0 = 0; k0 < K; k0 += 64)
        for (int64_t j = 0; j < nr; ++j)
          for (int64_t k = k0; k < std::min(K, k0 + 64); ++k) {
            if constexpr (kToPanels)
              dst[base + k * nr + j] = src[base + j * K + k];
            else
              dst[base + j * K + k] = src[base + k * nr + j];
          }
    }
  });
}

inline void pack_panels(const uint16_t* dense, int64_t N, int64_t K, uint16_t* packed) {
  copy_panels<true>(dense, N, K, packed);
}

inline void unpack_panels(const uint16_t* packed, int64_t N, int64_t K, uint16_t* dense) {
  copy_panels<false>(packed, N, K, dense);
}

}  // namespace customllm
