// Fused absorbed MLA decode over the paged latent cache (see model/ops/mla_decode.py for the math).
//
// Shapes: B sequences, H heads, L latent, R rope width per head, F = L + H*R cache entry width,
// NB cache blocks of BS tokens, MB blocks per block table, K context splits.
// One task per (sequence, split): it walks its share of the block table, reads each cached entry
// [c_kv | k_rope] in place once for all heads, scores a block at a time, updates an online softmax and mixes the
// latent, all in float32 (the register tiles: mla_decode_tiles.h). Splits of one sequence are merged afterwards
// (log-sum-exp weighting).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "mla_decode_tiles.h"
#include "vec.h"

namespace customllm {
namespace {

using namespace mla_tiles;

constexpr float kNoScore = -1e30f;  // a finite "minus infinity": the kernels build with -ffast-math

// Asks for the next block's entries a few cache lines per register tile while this block is computed: blocks
// are scattered, so the hardware prefetcher only starts on each after its first misses, and one burst of
// prefetches at the block's start stalls on the miss buffers as plain loads do (no gain measured).
struct Prefetcher {
  const char* next = nullptr;  // the next line to ask for
  const char* end = nullptr;
  int64_t lines_per_step = 0;

  void step() {
    for (int64_t i = 0; i < lines_per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// scores[h * n + t] = scale * (q_lat[h] . c_t + q_rope[h] . k_rope_{t,h}) for the block's n entries;
// part: H * n vectors of scratch.
template <typename T>
void score_block(const float* q_lat, const float* q_rope, const BlockRows<T>& rows, int64_t H, int64_t L, int64_t R,
                 int64_t F, float scale, vfloat* part, float* scores, Prefetcher& prefetch) {
  const int64_t n = rows.n;
  for (int64_t h0 = 0; h0 < H; h0 += kScoreHeads) {
    with_count<kScoreHeads>(std::min<int64_t>(kScoreHeads, H - h0), [&](auto nh) {
      for (int64_t t0 = 0; t0 < n; t0 += kScoreTokens) {
        with_count<kScoreTokens>(std::min<int64_t>(kScoreTokens, n - t0), [&](auto nt) {
          score_tile<decltype(nh)::value, decltype(nt)::value>(q_lat, q_rope, rows, h0, t0, L, R, F, part);
          prefetch.step();
        });
      }
    });
  }
  reduce_lanes(part, H * n, scale, scores);
  const int64_t lv = L / kLanes * kLanes, rv = R / kLanes * kLanes;
  if (lv == L && rv == R) return;  // the seed shapes: no scalar tails
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      const float* c = rows.lat + t * rows.lat_stride;
      const T* kr = rows.rope + t * F + h * R;
      float s = 0.f;
      for (int64_t k = lv; k < L; ++k) s += q_lat[h * L + k] * c[k];
      for (int64_t k = rv; k < R; ++k) s += q_rope[h * R + k] * as_float(kr[k]);
      scores[h * n + t] += s * scale;
    }
  }
}

// acc[h] = corr[h] * acc[h] + sum_t p[h * n + t] * c_t for the block's latents; acc [H, L].
template <typename T>
void mix_block(const float* p, const float* corr, const BlockRows<T>& rows, int64_t H, int64_t L, float* acc,
               Prefetcher& prefetch) {
  const int64_t lv = L / kLanes * kLanes, n = rows.n;
  for (int64_t h0 = 0; h0 < H; h0 += kMixHeads) {
    with_count<kMixHeads>(std::min<int64_t>(kMixHeads, H - h0), [&](auto nh) {
      for (int64_t k0 = 0; k0 < lv; k0 += kMixVecs * kLanes) {
        with_count<kMixVecs>(std::min<int64_t>(kMixVecs, (lv - k0) / kLanes), [&](auto nv) {
          mix_tile<decltype(nh)::value, decltype(nv)::value>(p, corr, rows.lat, rows.lat_stride, n, h0, k0, L, acc);
          prefetch.step();
        });
      }
    });
  }
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t k = lv; k < L; ++k) {
      float s = acc[h * L + k] * corr[h];
      for (int64_t t = 0; t < n; ++t) s += p[h * n + t] * rows.lat[t * rows.lat_stride + k];
      acc[h * L + k] = s;
    }
  }
}

// One block's step of the online softmax over its scores [H, n], in place: s[h, t] = exp(s[h, t] - m'[h]) with
// m'[h] = max(m[h], s[h, :]); the running max m and sum l move on, and corr[h] = exp(m[h] - m'[h]) is the factor
// that rescales what was summed and mixed before.
void softmax_block(float* scores, int64_t n, int64_t H, float* m, float* l, float* corr) {
  for (int64_t h = 0; h < H; ++h) {
    const float* s = scores + h * n;
    vfloat vmax = splat(m[h]);
    int64_t t = 0;
    for (; t + kLanes <= n; t += kLanes) {
      const vfloat x = load(s + t);
      vmax = x > vmax ? x : vmax;
    }
    float mx = max_of_lanes(vmax);
    for (; t < n; ++t) mx = std::max(mx, s[t]);
    corr[h] = m[h] - mx;  // the exponent for now
    m[h] = mx;
  }
  int64_t h = 0;
  for (; h + kLanes <= H; h += kLanes) store(corr + h, exp_nonpositive(load(corr + h)));
  for (; h < H; ++h) corr[h] = std::exp(corr[h]);
  for (h = 0; h < H; ++h) {
    float* s = scores + h * n;
    const vfloat mx = splat(m[h]);
    vfloat vsum{};
    int64_t t = 0;
    for (; t + kLanes <= n; t += kLanes) {
      const vfloat e = exp_nonpositive(load(s + t) - mx);
      store(s + t, e);
      vsum += e;
    }
    float sum = sum_of_lanes(vsum);
    for (; t < n; ++t) {
      s[t] = std::exp(s[t] - m[h]);
      sum += s[t];
    }
    l[h] = l[h] * corr[h] + sum;
  }
}

// Cache-line aligned scratch, not value-initialised: whole-vector loads from a 16-byte aligned buffer split
// every other 64-byte line.
struct Scratch {
  explicit Scratch(int64_t floats) : data(static_cast<float*>(std::aligned_alloc(64, (floats * 4 + 63) / 64 * 64))) {
    TORCH_CHECK(data != nullptr, "mla_decode: out of memory for ", floats, " floats of scratch");
  }
  ~Scratch() { std::free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data;
};

struct Partial {
  float* acc;  // [H, L] unnormalised mix
  float* m;    // [H] running max score
  float* l;    // [H] running sum of exp(score - m)
};

template <typename T>
void attend_range(const float* q_lat, const float* q_rope, const T* cache, const int64_t* table, int64_t first,
                  int64_t last, int64_t BS, int64_t H, int64_t L, int64_t R, float scale, Partial out) {
  constexpr bool kWiden = !std::is_same_v<T, float>;
  const int64_t F = L + H * R;
  // Widened latents [BS, L] (bfloat16 caches), the H * BS partial-dot vectors, the scores and rescaling factors.
  const int64_t lat_floats = kWiden ? (BS * L + 15) / 16 * 16 : 0;  // whole cache lines
  Scratch buf(lat_floats + H * BS * kLanes + H * BS + H);
  vfloat* part = reinterpret_cast<vfloat*>(buf.data + lat_floats);
  float* scores = buf.data + lat_floats + H * BS * kLanes;
  float* corr = scores + H * BS;
  // Register tiles per whole block (score and mix): the prefetch of the next block is spread over them.
  const int64_t tiles = (H + kScoreHeads - 1) / kScoreHeads * ((BS + kScoreTokens - 1) / kScoreTokens) +
                        (H + kMixHeads - 1) / kMixHeads * std::max<int64_t>(1, (L / kLanes + kMixVecs - 1) / kMixVecs);
  std::fill(out.acc, out.acc + H * L, 0.f);
  std::fill(out.m, out.m + H, kNoScore);
  std::fill(out.l, out.l + H, 0.f);
  for (int64_t pos = first; pos < last;) {
    const int64_t offset = pos % BS;
    const int64_t n = std::min(BS - offset, last - pos);
    const T* src = cache + (table[pos / BS] * BS + offset) * F;
    Prefetcher prefetch;
    if (pos + n < last) {
      const int64_t bytes = std::min(BS, last - pos - n) * F * int64_t(sizeof(T));
      prefetch.next = reinterpret_cast<const char*>(cache + table[(pos + n) / BS] * BS * F);
      prefetch.end = prefetch.next + bytes;
      prefetch.lines_per_step = (bytes / 64 + tiles) / tiles;
    }
    BlockRows<T> rows{nullptr, F, src + L, n};
    if constexpr (kWiden) {
      for (int64_t t = 0; t < n; ++t) widen_bf16(src + t * F, buf.data + t * L, L);
      rows.lat = buf.data;
      rows.lat_stride = L;
    } else {
      rows.lat = src;
    }
    score_block(q_lat, q_rope, rows, H, L, R, F, scale, part, scores, prefetch);
    softmax_block(scores, n, H, out.m, out.l, corr);
    mix_block(scores, corr, rows, H, L, out.acc, prefetch);
    pos += n;
  }
}

// q_lat [B, H, L] f32, q_rope [B, H, R] f32, cache [NB, BS, F] f32|bf16, block_tables [B, MB] i64,
// context_lens [B] i64 -> [B, H, L] f32: softmax(scale * q.k) mixed latents. num_splits 0 = chosen here.
at::Tensor mla_decode(const at::Tensor& q_lat, const at::Tensor& q_rope, const at::Tensor& cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                      int64_t num_splits) {
  TORCH_CHECK(q_lat.dim() == 3 && q_rope.dim() == 3 && cache.dim() == 3, "mla_decode: bad ranks");
  TORCH_CHECK(q_lat.scalar_type() == at::kFloat && q_rope.scalar_type() == at::kFloat, "mla_decode: f32 queries");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16, "mla_decode: cache dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "mla_decode: int64 tables");
  const int64_t B = q_lat.size(0), H = q_lat.size(1), L = q_lat.size(2), R = q_rope.size(2);
  const int64_t BS = cache.size(1), F = cache.size(2), MB = block_tables.size(1);
  TORCH_CHECK(F == L + H * R, "mla_decode: cache width ", F, " != L + H*R = ", L + H * R);
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "mla_decode: one table per sequence");
  auto ql = q_lat.contiguous(), qr = q_rope.contiguous(), kv = cache.contiguous();
  auto tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t* lens_p = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens_p[b] >= 1 && lens_p[b] <= MB * BS, "mla_decode: context length ", lens_p[b], " of sequence ",
                b, " outside 1..", MB * BS);

  if (num_splits <= 0) {
    // Enough tasks for every thread several times over, but no split shorter than two blocks.
    const int64_t threads = at::get_num_threads();
    num_splits = std::clamp<int64_t>((4 * threads + B - 1) / B, 1, std::max<int64_t>(1, MB / 2));
  }
  const int64_t K = std::min(num_splits, MB);
  auto out = at::empty({B, H, L}, q_lat.options());
  auto acc = K == 1 ? out : at::empty({B, K, H, L}, q_lat.options());
  auto ml = at::empty({B, K, 2, H}, q_lat.options());
  float* acc_p = acc.data_ptr<float>();
  float* ml_p = ml.data_ptr<float>();
  const float* ql_p = ql.data_ptr<float>();
  const float* qr_p = qr.data_ptr<float>();
  const int64_t* tab_p = tables.data_ptr<int64_t>();

  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, k = task % K;
      const int64_t blocks = (lens_p[b] + BS - 1) / BS;
      // Split k covers whole blocks [k*blocks/K, (k+1)*blocks/K) of this sequence (maybe none).
      const int64_t first = std::min(lens_p[b], k * blocks / K * BS);
      const int64_t last = std::min(lens_p[b], (k + 1) * blocks / K * BS);
      Partial part{acc_p + task * H * L, ml_p + task * 2 * H, ml_p + task * 2 * H + H};
      const float* q0 = ql_p + b * H * L;
      const float* r0 = qr_p + b * H * R;
      if (kv.scalar_type() == at::kFloat)
        attend_range(q0, r0, kv.data_ptr<float>(), tab_p + b * MB, first, last, BS, H, L, R, float(scale), part);
      else
        attend_range(q0, r0, reinterpret_cast<const uint16_t*>(kv.data_ptr<at::BFloat16>()), tab_p + b * MB, first,
                     last, BS, H, L, R, float(scale), part);
      if (K == 1) {
        for (int64_t h = 0; h < H; ++h) {
          const float inv = 1.f / part.l[h];
          for (int64_t j = 0; j < L; ++j) part.acc[h * L + j] *= inv;
        }
      }
    }
  });
  if (K == 1) return out;

  float* out_p = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float mx = kNoScore;
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, ml_p[(b * K + k) * 2 * H + h]);
      float* o = out_p + bh * L;
      std::fill(o, o + L, 0.f);
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float* part_ml = ml_p + (b * K + k) * 2 * H;
        if (part_ml[H + h] == 0.f) continue;  // an empty split
        const float w = std::exp(part_ml[h] - mx);
        total += w * part_ml[H + h];
        const float* a = acc_p + ((b * K + k) * H + h) * L;
        for (int64_t j = 0; j < L; ++j) o[j] += w * a[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < L; ++j) o[j] *= inv;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) {
  m.def("mla_decode(Tensor q_lat, Tensor q_rope, Tensor cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int num_splits) -> Tensor");
  m.impl("mla_decode", c10::DispatchKey::CPU, &mla_decode);
}

}  // namespace customllm
