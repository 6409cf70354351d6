// RMSNorm of bfloat16 rows with the reference's two roundings (MODEL_SPEC, model/layers.py):
// out = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))), x widened and the mean taken in float32.
// One pass per row: torch's F.rms_norm on a few bfloat16 rows costs 70-100 us a call on AVX2, and a decode step
// runs 60 of them.
//
// Shapes: R rows of D features.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "float_rows.h"

namespace customllm {
namespace {

void norm_row(const uint16_t* x, const uint16_t* w, int64_t D, float eps, uint16_t* out) {
  const int64_t dv = D / kLanes * kLanes;
  vfloat acc{};
  for (int64_t d = 0; d < dv; d += kLanes) {
    const vfloat v = load_bf16(x + d);
    acc += v * v;
  }
  float ss = hsum(acc);
  for (int64_t d = dv; d < D; ++d) ss += bf16_to_float(x[d]) * bf16_to_float(x[d]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < dv; d += kLanes)
    store_bf16(out + d, round_bf16(load_bf16(w + d) * round_bf16(load_bf16(x + d) * r)));
  for (int64_t d = dv; d < D; ++d)
    out[d] = float_to_bf16(bf16_to_float(w[d]) * round_bf16(bf16_to_float(x[d]) * r));
}

// x [..., D] bfloat16, weight [D] bfloat16 -> [..., D] bfloat16.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm: bfloat16");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: x ", x.sizes(),
              " weight ", weight.sizes());
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int64_t D = x.size(-1), R = D == 0 ? 0 : xc.numel() / D;
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, R, rows_per_task(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * D, wp, D, static_cast<float>(eps), op + r * D);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
}

}  // namespace customllm
