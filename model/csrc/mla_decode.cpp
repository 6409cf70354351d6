// Fused absorbed MLA decode over the paged latent cache (see model/ops/mla_decode.py for the math).
//
// Shapes: B sequences, H heads, L latent, R rope width per head, F = L + H*R cache entry width,
// NB cache blocks of BS tokens, MB blocks per block table, K context splits.
// One task per (sequence, split): it walks its share of the block table, reads each cached entry
// [c_kv | k_rope] in place once for all heads, scores it, updates an online softmax and mixes the latent,
// all in float32. Splits of one sequence are merged afterwards (log-sum-exp weighting).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace customllm {
namespace {

constexpr float kNoScore = -1e30f;  // a finite "minus infinity": the kernels build with -ffast-math

// scores[h * n + t] = scale * (q_lat[h] . c_t + q_rope[h] . k_rope_{t,h}) for the n rows of `rows` [n, F].
void score_tile(const float* q_lat, const float* q_rope, const float* rows, int64_t n, int64_t H, int64_t L,
                int64_t R, int64_t F, float scale, float* scores) {
  const int64_t lv = L / kLanes * kLanes;
  const int64_t rv = R / kLanes * kLanes;
  for (int64_t t = 0; t < n; ++t) {
    const float* c = rows + t * F;
    // Three heads at a time share each load of the latent.
    int64_t h = 0;
    for (; h + 3 <= H; h += 3) {
      const float* q0 = q_lat + h * L;
      const float* q1 = q0 + L;
      const float* q2 = q1 + L;
      vfloat a0{}, a1{}, a2{};
      for (int64_t k = 0; k < lv; k += kLanes) {
        vfloat ck = load(c + k);
        a0 += load(q0 + k) * ck;
        a1 += load(q1 + k) * ck;
        a2 += load(q2 + k) * ck;
      }
      float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2);
      for (int64_t k = lv; k < L; ++k) {
        s0 += q0[k] * c[k];
        s1 += q1[k] * c[k];
        s2 += q2[k] * c[k];
      }
      scores[h * n + t] = s0;
      scores[(h + 1) * n + t] = s1;
      scores[(h + 2) * n + t] = s2;
    }
    for (; h < H; ++h) {
      const float* q0 = q_lat + h * L;
      vfloat a0{};
      for (int64_t k = 0; k < lv; k += kLanes) a0 += load(q0 + k) * load(c + k);
      float s0 = hsum(a0);
      for (int64_t k = lv; k < L; ++k) s0 += q0[k] * c[k];
      scores[h * n + t] = s0;
    }
    // Each head's rope query meets only its own R slots of the entry.
    for (h = 0; h < H; ++h) {
      const float* qr = q_rope + h * R;
      const float* kr = c + L + h * R;
      vfloat a{};
      for (int64_t k = 0; k < rv; k += kLanes) a += load(qr + k) * load(kr + k);
      float s = hsum(a);
      for (int64_t k = rv; k < R; ++k) s += qr[k] * kr[k];
      scores[h * n + t] = (scores[h * n + t] + s) * scale;
    }
  }
}

// acc[h] += sum_t p[h * n + t] * c_t for the latents of `rows` [n, F]; acc [H, L].
void mix_tile(const float* p, const float* rows, int64_t n, int64_t H, int64_t L, int64_t F, float* acc) {
  const int64_t lv = L / kLanes * kLanes;
  int64_t h = 0;
  // Four heads' accumulators of one latent chunk stay in registers over the whole tile.
  for (; h + 4 <= H; h += 4) {
    for (int64_t k = 0; k < lv; k += kLanes) {
      float* o = acc + h * L + k;
      vfloat a0 = load(o), a1 = load(o + L), a2 = load(o + 2 * L), a3 = load(o + 3 * L);
      for (int64_t t = 0; t < n; ++t) {
        vfloat ck = load(rows + t * F + k);
        a0 += splat(p[h * n + t]) * ck;
        a1 += splat(p[(h + 1) * n + t]) * ck;
        a2 += splat(p[(h + 2) * n + t]) * ck;
        a3 += splat(p[(h + 3) * n + t]) * ck;
      }
      store(o, a0);
      store(o + L, a1);
      store(o + 2 * L, a2);
      store(o + 3 * L, a3);
    }
  }
  for (; h < H; ++h) {
    for (int64_t k = 0; k < lv; k += kLanes) {
      vfloat a = load(acc + h * L + k);
      for (int64_t t = 0; t < n; ++t) a += splat(p[h * n + t]) * load(rows + t * F + k);
      store(acc + h * L + k, a);
    }
  }
  for (h = 0; h < H; ++h)
    for (int64_t k = lv; k < L; ++k)
      for (int64_t t = 0; t < n; ++t) acc[h * L + k] += p[h * n + t] * rows[t * F + k];
}

struct Partial {
  float* acc;  // [H, L] unnormalised mix
  float* m;    // [H] running max score
  float* l;    // [H] running sum of exp(score - m)
};

template <typename T>
void attend_range(const float* q_lat, const float* q_rope, const T* cache, const int64_t* table, int64_t first,
                  int64_t last, int64_t BS, int64_t H, int64_t L, int64_t R, float scale, Partial out) {
  const int64_t F = L + H * R;
  std::vector<float> rows_buf(std::is_same_v<T, float> ? 0 : BS * F);
  std::vector<float> scores(H * BS);
  std::fill(out.acc, out.acc + H * L, 0.f);
  std::fill(out.m, out.m + H, kNoScore);
  std::fill(out.l, out.l + H, 0.f);
  for (int64_t pos = first; pos < last;) {
    const int64_t block = table[pos / BS];
    const int64_t offset = pos % BS;
    const int64_t n = std::min(BS - offset, last - pos);
    const T* src = cache + (block * BS + offset) * F;
    const float* rows;
    if constexpr (std::is_same_v<T, float>) {
      rows = src;
    } else {
      widen_bf16(reinterpret_cast<const uint16_t*>(src), rows_buf.data(), n * F);
      rows = rows_buf.data();
    }
    score_tile(q_lat, q_rope, rows, n, H, L, R, F, scale, scores.data());
    for (int64_t h = 0; h < H; ++h) {
      float* s = scores.data() + h * n;
      float mx = out.m[h];
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
      const float correction = std::exp(out.m[h] - mx);
      out.m[h] = mx;
      float sum = 0.f;
      int64_t t = 0;
      for (; t + kLanes <= n; t += kLanes) {
        vfloat e = exp_nonpositive(load(s + t) - splat(mx));
        store(s + t, e);
        sum += hsum(e);
      }
      for (; t < n; ++t) {
        s[t] = std::exp(s[t] - mx);
        sum += s[t];
      }
      out.l[h] = out.l[h] * correction + sum;
      if (correction != 1.f) {
        float* a = out.acc + h * L;
        for (int64_t k = 0; k < L; ++k) a[k] *= correction;
      }
    }
    mix_tile(scores.data(), rows, n, H, L, F, out.acc);
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
