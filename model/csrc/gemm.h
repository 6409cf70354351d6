// GEMM out = x . w^T with float32 activations and bfloat16 or float32 weights [N, K], accumulating in float32
// with FMA. bfloat16 weights stay bfloat16 in memory (half the bytes, which decides decode speed) and are widened
// in registers. Two kernels, chosen by the row count M:
//
// - M < kOuterMinRows (decode at small batch, memory-bound; the MoE experts' token groups): inner products, a
//   register tile of up to 3 input rows x the 4 weight rows of one panel (below), read once for all of them,
//   with software prefetch ahead of the weight stream.
// - M >= kOuterMinRows (large batch, prefill: FLOP-bound): outer products. x is packed once per call into
//   column panels xp [M/kMT][K][kMT] (kMT = 2 vectors of rows, zero padded); a tile of kNW weight rows x kKC
//   features is widened once into an L1 buffer and reused for every row panel; the micro-kernel broadcasts one
//   weight and FMAs it into kMT rows: kNW x 2 vector accumulators, no horizontal sums.
//
// Weight layouts. float32 weights are dense rows [N, K]. bfloat16 weights are PANELS (pack_panels, once at
// load): groups of kPanel consecutive rows (the last group has N % kPanel rows when N is not a multiple), each
// stored chunk by chunk: for each chunk of kLanes features, the group's rows' kLanes values one after another;
// then the last K % kLanes features of each row, row by row. Same element count as [N, K]. A decode GEMV then
// streams each thread's share of the weight as one sequential run, which the hardware prefetcher follows; the
// dense layout's kPanel row streams, 1.5-3 KB apart, streamed 1.4x slower (Zen 3: the experts' GEMVs of a
// batch-1 step, one and two threads). The panel layout depends on kLanes, so it is built by the same build.
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

constexpr int kPanel = 4;          // weight rows per panel (bfloat16 layout) and per register tile
constexpr int64_t kRowBlock = 64;  // input rows per pass over the weight: their float32 copy stays in L2
constexpr int64_t kAhead = 512;    // weight elements prefetched ahead of the loads (1 KB of bfloat16)

inline vfloat load_w(const float* p) { return load(p); }
inline vfloat load_w(const uint16_t* p) { return load_bf16(p); }
inline float scalar_w(float v) { return v; }
inline float scalar_w(uint16_t v) { return bf16_to_float(v); }

// Where row j of panel p (rows j < rows(p)) keeps its whole chunks (chunk c at chunk0 + c * step) and its
// K % kLanes tail features. float32: dense rows; bfloat16: panels (see the top of this file).
template <typename W>
struct Layout {
  const W* w;
  int64_t N, K;
  int64_t full() const { return K / kLanes * kLanes; }  // features in whole chunks
  int rows(int64_t p) const { return static_cast<int>(std::min<int64_t>(kPanel, N - p * kPanel)); }
  int64_t step(int rows) const { return std::is_same_v<W, float> ? kLanes : rows * kLanes; }
  const W* chunk0(int64_t p, int rows, int j) const {
    return std::is_same_v<W, float> ? w + (p * kPanel + j) * K : w + p * kPanel * K + j * kLanes;
  }
  const W* tail(int64_t p, int rows, int j) const {
    return std::is_same_v<W, float> ? chunk0(p, rows, j) + full() : w + p * kPanel * K + full() * rows + j * (K - full());
  }
  // Element (row n, feature k).
  const W* at(int64_t n, int64_t k) const {
    const int64_t p = n / kPanel;
    const int r = rows(p), j = static_cast<int>(n % kPanel);
    return k < full() ? chunk0(p, r, j) + k / kLanes * step(r) + k % kLanes : tail(p, r, j) + (k - full());
  }
};

// ---- inner products ----
// out[i][j] = x[i] . w[row j of panel p] for MR input rows and the panel's NR rows (kPanel, fewer in the last).
template <int MR, int NR, typename W>
void tile(const float* x, int64_t ldx, const Layout<W>& w, int64_t p, float* out, int64_t ldo) {
  constexpr bool kDense = std::is_same_v<W, float>;
  const int64_t kf = w.full(), step = w.step(NR);
  // Row j's current chunk is q + j * stride: dense rows are K apart, a panel's rows kLanes (a constant).
  const int64_t stride = kDense ? w.K : kLanes;
  const W* q = w.chunk0(p, NR, 0);
  vfloat acc[MR][NR] = {};
  for (int64_t k = 0; k < kf; k += kLanes, q += step) {
    if constexpr (kDense) {
      if (k % 16 == 0)  // one prefetch per cache line of each row
        for (int j = 0; j < NR; ++j) __builtin_prefetch(q + j * stride + kAhead, 0, 3);
    } else {
      // A panel's chunk is one cache line at 8 lanes, two at 16.
      for (int64_t line = 0; line < kPanel * kLanes; line += 32) __builtin_prefetch(q + kAhead + line, 0, 3);
    }
    vfloat xk[MR];
    for (int i = 0; i < MR; ++i) xk[i] = load(x + i * ldx + k);
    for (int j = 0; j < NR; ++j) {
      const vfloat wk = load_w(q + j * stride);
      for (int i = 0; i < MR; ++i) acc[i][j] += xk[i] * wk;
    }
  }
  for (int j = 0; j < NR; ++j) {
    const W* t = w.tail(p, NR, j);
    for (int i = 0; i < MR; ++i) {
      float s = hsum(acc[i][j]);
      for (int64_t k = kf; k < w.K; ++k) s += x[i * ldx + k] * scalar_w(t[k - kf]);
      out[i * ldo + j] = s;
    }
  }
}

template <int MR, typename W>
void tile_rows(int rows, const float* x, int64_t ldx, const Layout<W>& w, int64_t p, float* out, int64_t ldo) {
  switch (rows) {
    case 4: tile<MR, 4>(x, ldx, w, p, out, ldo); break;
    case 3: tile<MR, 3>(x, ldx, w, p, out, ldo); break;
    case 2: tile<MR, 2>(x, ldx, w, p, out, ldo); break;
    default: tile<MR, 1>(x, ldx, w, p, out, ldo); break;
  }
}

template <typename W>
void tile_any(int mr, int rows, const float* x, int64_t ldx, const Layout<W>& w, int64_t p, float* out,
              int64_t ldo) {
  switch (mr) {
    case 3: tile_rows<3>(rows, x, ldx, w, p, out, ldo); break;
    case 2: tile_rows<2>(rows, x, ldx, w, p, out, ldo); break;
    default: tile_rows<1>(rows, x, ldx, w, p, out, ldo); break;
  }
}

// Register tiles of up to kMR (2 or 3) input rows x one whole panel. Each thread takes one contiguous range of
// panels: it streams one run of the weight.
template <int kMR, typename W>
void gemm_inner(const float* x, int64_t M, const Layout<W>& w, float* out, int64_t ldo) {
  static_assert(kMR == 2 || kMR == 3, "tile_any dispatches 1 to 3 input rows");
  const int64_t panels = (w.N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t p = begin; p < end; ++p) {
        const int rows = w.rows(p);
        for (int64_t m = m0; m < m1; m += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
          tile_any(mr, rows, x + m * w.K, w.K, w, p, out + m * ldo + p * kPanel, ldo);
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

// dst[k - k0] = w[n][k] for k in [k0, k0 + kc), k0 a multiple of kLanes: a panel row widened to float32.
inline void widen_row(const Layout<uint16_t>& w, int64_t n, int64_t k0, int64_t kc, float* dst) {
  const int64_t end = k0 + kc, full = std::min(end, w.full());
  int64_t k = k0;
  if (k < full) {
    const uint16_t* src = w.at(n, k);
    const int64_t step = w.step(w.rows(n / kPanel));
    for (; k < full; k += kLanes, src += step) store(dst + (k - k0), load_bf16(src));
  }
  for (; k < end; ++k) dst[k - k0] = bf16_to_float(*w.at(n, k));
}

template <typename W, int64_t KC = kKC>
void gemm_outer(const float* x, int64_t M, const Layout<W>& w, float* out, int64_t ldo) {
  const int64_t K = w.K, N = w.N;
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
  // Balanced feature blocks of at most about KC, whole chunks (a panel row widens chunk by chunk).
  const int64_t kblocks = (K + KC - 1) / KC;
  const int64_t kc_max = ((K + kblocks - 1) / kblocks + kLanes - 1) / kLanes * kLanes;
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
              wr[j] = w.at(n + j, k0);
            } else {
              widen_row(w, n + j, k0, kc, row);
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

constexpr int64_t kOuterMinRows = 32;  // measured on panels: inner products win up to M = 24, outer products from 32

// x [M, K] float32, w [N, K] (float32 dense rows, or bfloat16 panels) -> out [M, N] float32 (row stride ldo).
// Parallel over N (call it outside any parallel region).
template <typename W>
void gemm(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* out, int64_t ldo) {
  const gemm_detail::Layout<W> layout{w, N, K};
  // Tile shapes (bench/gemm_ab.py, Zen 3): whole panels, 2x4 at M <= 2 and 3x4 from M = 3 (12 accumulators, 3 x
  // vectors and the weight vector: the 16 AVX2 registers). Against the dense layout's 1x4/4x3 tiles: M = 1
  // streams 1.2-1.4x faster, M = 8 about the same, M = 4 0.85-0.95x; 4x2 half panels were slower at M = 8.
  if (M >= kOuterMinRows)
    gemm_detail::gemm_outer(x, M, layout, out, ldo);
  else if (M <= 2)
    gemm_detail::gemm_inner<2>(x, M, layout, out, ldo);
  else
    gemm_detail::gemm_inner<3>(x, M, layout, out, ldo);
}

// Dense bfloat16 [N, K] <-> panels (bit copies), a row's whole chunks and then its tail at a time.
template <bool kToPanels>
void copy_panels(const uint16_t* src, int64_t N, int64_t K, uint16_t* dst) {
  const gemm_detail::Layout<uint16_t> layout{kToPanels ? dst : src, N, K};
  const int64_t kf = layout.full();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t p = n / gemm_detail::kPanel;
      const int rows = layout.rows(p), j = static_cast<int>(n % gemm_detail::kPanel);
      const int64_t panel = layout.chunk0(p, rows, j) - layout.w, tail = layout.tail(p, rows, j) - layout.w;
      const int64_t step = layout.step(rows);
      for (int64_t k = 0; k < kf; k += kLanes) {
        const int64_t at = panel + k / kLanes * step;
        if constexpr (kToPanels)
          std::copy_n(src + n * K + k, kLanes, dst + at);
        else
          std::copy_n(src + at, kLanes, dst + n * K + k);
      }
      if constexpr (kToPanels)
        std::copy_n(src + n * K + kf, K - kf, dst + tail);
      else
        std::copy_n(src + tail, K - kf, dst + n * K + kf);
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
