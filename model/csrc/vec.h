// Portable SIMD helpers for the CPU kernels: GCC vector extensions, so one source compiles to AVX2 (8 lanes)
// or AVX-512 (16 lanes) from the -m flags the loader picks (model/ops/cpu_extension.py).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace customllm {

// CUSTOMLLM_LANES=16 without AVX-512 (the loader's test-only level avx2-16lanes) compiles the 16-lane logic to
// pairs of AVX2 instructions, so an AVX2 CPU can check AVX-512's tiling and tails against the torch oracle.
#if defined(CUSTOMLLM_LANES)
#define CUSTOMLLM_VEC_LANES CUSTOMLLM_LANES
#elif defined(__AVX512F__)
#define CUSTOMLLM_VEC_LANES 16
#else
#define CUSTOMLLM_VEC_LANES 8
#endif
constexpr int kLanes = CUSTOMLLM_VEC_LANES;
static_assert(kLanes == 8 || kLanes == 16, "CUSTOMLLM_LANES must be 8 or 16");

// Unaligned, may-alias vector of floats: loads and stores through it compile to vmovups.
typedef float vfloat __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));
typedef uint16_t vbf16 __attribute__((vector_size(kLanes * 2), aligned(2), may_alias));
typedef uint32_t vu32 __attribute__((vector_size(kLanes * 4)));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat*>(p) = v; }
inline vfloat splat(float x) { return vfloat{} + x; }

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// bfloat16 is the top half of a float32: widen and shift (exact). The intrinsics make it one vpmovzxwd from
// memory and one shift; GCC lowers __builtin_convertvector to two half-width widens and an insert.
inline vfloat load_bf16(const uint16_t* p) {
#if CUSTOMLLM_VEC_LANES == 16 && defined(__AVX512F__)
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
#elif CUSTOMLLM_VEC_LANES == 8 && defined(__AVX2__)
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16);
#else
  const vu32 wide = __builtin_convertvector(*reinterpret_cast<const vbf16*>(p), vu32) << 16;
#endif
  vfloat out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline float bf16_to_float(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; a NaN becomes the quiet NaN 0x7FC0, as in torch.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// float32 -> the float32 value of its bfloat16 rounding: nearest even and NaN as float_to_bf16 (the integer
// compare survives -ffast-math).
inline vfloat round_bf16(vfloat v) {
  vu32 u;
  std::memcpy(&u, &v, sizeof(u));
  const auto nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  u = nan ? vu32{} + 0x7FC00000u : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline float round_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

// Store kLanes values already rounded by round_bf16 (their top halves) as bfloat16.
inline void store_bf16(uint16_t* p, vfloat v) {
  vu32 u;
  std::memcpy(&u, &v, sizeof(u));
  const vbf16 h = __builtin_convertvector(u >> 16, vbf16);
  std::memcpy(p, &h, sizeof(h));
}

// Convert n bfloat16 values to float32 (n a multiple of kLanes, with a scalar tail otherwise).
inline void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load_bf16(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// exp(x) for x <= 0 (softmax arguments after the max is subtracted), relative error ~2e-7:
// 2^n * p(r) with n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-6 Taylor polynomial.
inline vfloat exp_nonpositive(vfloat x) {
  typedef int32_t vi32 __attribute__((vector_size(kLanes * 4)));
  x = x < splat(-87.f) ? splat(-87.f) : x;
  vfloat t = x * splat(1.44269504f) - splat(0.5f);
  // t <= -0.5, so truncation toward zero is ceil(x/ln2 - 0.5): x/ln2 rounded to nearest.
  vi32 n = __builtin_convertvector(t, vi32);
  vfloat nf = __builtin_convertvector(n, vfloat);
  vfloat r = x - nf * splat(0.693147181f);
  vfloat p = splat(1.f / 720);
  p = p * r + splat(1.f / 120);
  p = p * r + splat(1.f / 24);
  p = p * r + splat(1.f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  vi32 bits = (n + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace customllm
