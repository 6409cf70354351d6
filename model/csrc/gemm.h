// Register-tiled GEMM out = x . w^T with float32 activations and bfloat16 or float32 weights, accumulating in
// float32 with FMA. bfloat16 weights stay bfloat16 in memory (half the bytes, which decides decode speed) and
// are widened in registers.
//
// Shapes: M rows of input, K input features, N output features.
// Register tile: kMR rows x kNR output features (12 accumulators); the weight rows of one tile are read once
// per block of kRowBlock input rows and reused for all of them.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace customllm {
namespace gemm_detail {

constexpr int kMR = 4;
constexpr int kNR = 3;
constexpr int64_t kRowBlock = 64;  // input rows per pass over the weight: their float32 copy stays in L2

inline vfloat load_w(const float* p) { return load(p); }
inline vfloat load_w(const uint16_t* p) { return load_bf16(p); }
inline float scalar_w(float v) { return v; }
inline float scalar_w(uint16_t v) { return bf16_to_float(v); }

// out[m][n] = x[m] . w[n] for a tile of MR rows and NR weight rows; x float32 [*, K], w [*, K].
template <int MR, int NR, typename W>
void tile(const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo) {
  const int64_t kv = K / kLanes * kLanes;
  vfloat acc[MR][NR] = {};
  for (int64_t k = 0; k < kv; k += kLanes) {
    vfloat wk[NR];
    for (int j = 0; j < NR; ++j) wk[j] = load_w(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const vfloat xk = load(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xk * wk[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = kv; k < K; ++k) s += x[i * ldx + k] * scalar_w(w[j * K + k]);
      out[i * ldo + j] = s;
    }
  }
}

template <int MR, typename W>
void tile_rows(int nr, const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo) {
  switch (nr) {
    case 3: tile<MR, 3, W>(x, ldx, w, K, out, ldo); break;
    case 2: tile<MR, 2, W>(x, ldx, w, K, out, ldo); break;
    default: tile<MR, 1, W>(x, ldx, w, K, out, ldo); break;
  }
}

template <typename W>
void tile_any(int mr, int nr, const float* x, int64_t ldx, const W* w, int64_t K, float* out, int64_t ldo) {
  switch (mr) {
    case 4: tile_rows<4, W>(nr, x, ldx, w, K, out, ldo); break;
    case 3: tile_rows<3, W>(nr, x, ldx, w, K, out, ldo); break;
    case 2: tile_rows<2, W>(nr, x, ldx, w, K, out, ldo); break;
    default: tile_rows<1, W>(nr, x, ldx, w, K, out, ldo); break;
  }
}

}  // namespace gemm_detail

// x [M, K] float32, w [N, K] -> out [M, N] float32 (row stride ldo). Parallel over N (call it outside any
// parallel region).
template <typename W>
void gemm(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* out, int64_t ldo) {
  using namespace gemm_detail;
  // Enough column blocks for every thread, each a whole number of register tiles.
  const int64_t grain = std::max<int64_t>(kNR, (N / (4 * at::get_num_threads()) + kNR - 1) / kNR * kNR);
  at::parallel_for(0, (N + grain - 1) / grain, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * grain, n1 = std::min(N, n0 + grain);
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t m1 = std::min(M, m0 + kRowBlock);
        for (int64_t n = n0; n < n1; n += kNR) {
          const int nr = static_cast<int>(std::min<int64_t>(kNR, n1 - n));
          for (int64_t m = m0; m < m1; m += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
            tile_any(mr, nr, x + m * K, K, w + n * K, K, out + m * ldo + n, ldo);
          }
        }
      }
    }
  });
}

}  // namespace customllm
