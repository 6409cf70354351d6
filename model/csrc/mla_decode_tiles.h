// Register tiles of the fused MLA decode kernel (mla_decode.cpp): one cache block's scores and latent mix.
//
// Shapes: H heads, L latent, R rope width per head, F = L + H*R cache entry width, n tokens of one block.
// Per block the scores are a small GEMM [H, L + R] x [n, L + R]^T (the rope part block-diagonal: head h meets
// only its own R slots of each entry) and the mix one [H, n] x [n, L]. Each is tiled so that one loaded vector
// feeds several FMAs, 12 accumulators per tile. Zen 3 issues 2 FMAs and 2 vector loads per cycle: the scores
// tile (3 heads x 4 tokens) loads 9 vectors per 12 FMAs on AVX2 (16 registers: GCC keeps 3 of the 4 token vectors
// and reads the 4th from memory per head; the previous kernel loaded 4 per 3 FMAs and did 12 horizontal sums per
// token), the mix tile (4 heads x 3 latent vectors) 3 vectors and 4 broadcasts per 12 FMAs (previously 1 and 4
// per 4). Blocks of 16 tokens and 12 heads leave no remainder tiles; 4 x 3 scores measured no faster with one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vec.h"

namespace customllm {
namespace mla_tiles {

constexpr int kScoreHeads = 3, kScoreTokens = 4;  // scores: heads x tokens dot products per tile
constexpr int kMixHeads = 4, kMixVecs = 3;        // mix: heads x latent vectors accumulated per tile

// A block's entries as the tiles read them: latents at `lat` with stride `lat_stride` floats (the float cache
// in place, or a bfloat16 block widened into scratch), rope slots in the cache's own dtype at `rope`
// (entry 0's first rope slot) with stride F. Rope values are read once each, so they are widened in registers.
template <typename T>
struct BlockRows {
  const float* lat;
  int64_t lat_stride;
  const T* rope;
  int64_t n;
};

inline vfloat load_as_float(const float* p) { return load(p); }
inline vfloat load_as_float(const uint16_t* p) { return load_bf16(p); }
inline float as_float(float x) { return x; }
inline float as_float(uint16_t x) { return bf16_to_float(x); }

// fn(std::integral_constant<int, n>) for 1 <= n <= N: a tile's remainder runs the tile's code at its size.
template <int N, typename Fn>
inline void with_count(int64_t n, Fn&& fn) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, fn);
  }
  fn(std::integral_constant<int, N>{});
}

// part[h * n + t] = a vector whose lanes sum to q_h . entry_t over the whole vectors of the latent and of head h's
// rope slots, for NH heads from h0 and NT tokens from t0; the scalar tails (L or R not whole vectors) come later.
template <int NH, int NT, typename T>
void score_tile(const float* q_lat, const float* q_rope, const BlockRows<T>& rows, int64_t h0, int64_t t0,
                int64_t L, int64_t R, int64_t F, vfloat* part) {
  const int64_t lv = L / kLanes * kLanes, rv = R / kLanes * kLanes;
  vfloat acc[NH][NT] = {};
  const float* c = rows.lat + t0 * rows.lat_stride;
  for (int64_t k = 0; k < lv; k += kLanes) {
    vfloat x[NT];
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) x[j] = load(c + j * rows.lat_stride + k);
#pragma GCC unroll 4
    for (int i = 0; i < NH; ++i) {
      const vfloat q = load(q_lat + (h0 + i) * L + k);
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) acc[i][j] += q * x[j];
    }
  }
  // No sharing across heads in the rope part. Heads inner: the NH * NT accumulators take independent FMAs
  // rather than one chain of R / kLanes each (latency bound).
  const T* kr = rows.rope + t0 * F;
  for (int64_t k = 0; k < rv; k += kLanes) {
#pragma GCC unroll 8
    for (int i = 0; i < NH; ++i) {
      const vfloat q = load(q_rope + (h0 + i) * R + k);
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) acc[i][j] += q * load_as_float(kr + j * F + (h0 + i) * R + k);
    }
  }
  const int64_t n = rows.n;
#pragma GCC unroll 4
  for (int i = 0; i < NH; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NT; ++j) part[(h0 + i) * n + t0 + j] = acc[i][j];
}

// (a, b) -> one vector: lanes with bit W clear hold a's lanes folded pairwise (a[i] + a[i + W]), lanes with it
// set hold b's (b[i - W] + b[i]). log2(kLanes) levels of these sum kLanes vectors at once (see reduce_lanes).
template <int W>
inline vfloat fold(vfloat a, vfloat b) {
  typedef int32_t vi32 __attribute__((vector_size(kLanes * 4)));
  vi32 lo, hi;
  for (int i = 0; i < kLanes; ++i) {
    lo[i] = (i & W) ? kLanes + i - W : i;
    hi[i] = (i & W) ? kLanes + i : i + W;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

template <int W>
inline vfloat fold_all(const vfloat* v) {  // the kLanes / W input vectors of this subtree, in order
  if constexpr (W == kLanes / 2) {
    return fold<W>(v[0], v[1]);
  } else {
    return fold<W>(fold_all<W * 2>(v), fold_all<W * 2>(v + kLanes / (2 * W)));
  }
}

constexpr int bit_reverse(int i) {
  int r = 0;
  for (int b = 1; b < kLanes; b <<= 1) r = (r << 1) | ((i & b) ? 1 : 0);
  return r;
}

// out[i] = scale * the sum of v[i]'s lanes for i < count: kLanes vectors at a time through a butterfly of folds
// (kLanes - 1 folds per kLanes sums, instead of a serial horizontal sum each).
inline void reduce_lanes(const vfloat* v, int64_t count, float scale, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    // The butterfly leaves input position p's sum in lane bit_reverse(p): feed it bit-reversed.
    vfloat in[kLanes];
#pragma GCC unroll 16
    for (int p = 0; p < kLanes; ++p) in[p] = v[i + bit_reverse(p)];
    store(out + i, fold_all<1>(in) * splat(scale));
  }
  for (; i < count; ++i) out[i] = hsum(v[i]) * scale;
}

// The max / the sum of v's lanes, by folding v onto itself in registers (GCC's lane-by-lane loop goes through
// the stack, and the reloads stall on store forwarding).
template <int W = kLanes / 2>
inline vfloat lanes_max(vfloat v) {
  typedef int32_t vi32 __attribute__((vector_size(kLanes * 4)));
  vi32 swap;
  for (int i = 0; i < kLanes; ++i) swap[i] = i ^ W;
  const vfloat u = __builtin_shuffle(v, swap);
  v = u > v ? u : v;
  if constexpr (W > 1) return lanes_max<W / 2>(v);
  return v;
}

inline float max_of_lanes(vfloat v) { return lanes_max(v)[0]; }

template <int W = kLanes / 2>
inline vfloat lanes_sum(vfloat v) {
  typedef int32_t vi32 __attribute__((vector_size(kLanes * 4)));
  vi32 swap;
  for (int i = 0; i < kLanes; ++i) swap[i] = i ^ W;
  v += __builtin_shuffle(v, swap);
  if constexpr (W > 1) return lanes_sum<W / 2>(v);
  return v;
}

inline float sum_of_lanes(vfloat v) { return lanes_sum(v)[0]; }

// acc[h, k0 + v * kLanes ...] = corr[h] * acc[h, ...] + sum_t p[h * n + t] * c_t[...] for NH heads from h0 and
// NV latent vectors from k0; acc [H, L].
template <int NH, int NV>
void mix_tile(const float* p, const float* corr, const float* lat, int64_t lat_stride, int64_t n, int64_t h0,
              int64_t k0, int64_t L, float* acc) {
  vfloat a[NH][NV];
#pragma GCC unroll 4
  for (int i = 0; i < NH; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[i][v] = load(acc + (h0 + i) * L + k0 + v * kLanes) * splat(corr[h0 + i]);
  for (int64_t t = 0; t < n; ++t) {
    vfloat x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = load(lat + t * lat_stride + k0 + v * kLanes);
#pragma GCC unroll 4
    for (int i = 0; i < NH; ++i) {
      const vfloat w = splat(p[(h0 + i) * n + t]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[i][v] += w * x[v];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NH; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(acc + (h0 + i) * L + k0 + v * kLanes, a[i][v]);
}

}  // namespace mla_tiles
}  // namespace customllm
