// The float32 rows gemm.h reads, from an input in whatever dtype the caller has.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "vec.h"

namespace customllm {

// Rows per task of an elementwise pass over rows of `width` values: a few microseconds of work, so decode
// sizes stay on one thread.
inline int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// x [M, K] as float32 rows K apart. A bfloat16 x with unit feature stride (rows may be strided: a column slice
// of a fused projection) is widened into `widened` here; anything else is converted by aten into `converted`
// (no copy for a contiguous float32 x). At decode sizes an aten conversion's dispatch (~10 us) costs more than
// the work.
inline const float* float_rows(const at::Tensor& x, std::vector<float>& widened, at::Tensor& converted) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() != at::kBFloat16 || x.stride(1) != 1) {
    converted = x.to(at::kFloat).contiguous();
    return converted.data_ptr<float>();
  }
  widened.resize(M * K);
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, M, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) widen_bf16(src + m * x.stride(0), widened.data() + m * K, K);
  });
  return widened.data();
}

}  // namespace customllm
