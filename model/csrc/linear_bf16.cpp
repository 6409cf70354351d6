// bfloat16-weight linear layer for CPUs without native bfloat16 GEMM (AVX2, AVX-512F without BF16), where
// torch's bfloat16 F.linear falls to a slow reference path. The GEMM is gemm.h's.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "gemm.h"

namespace customllm {
namespace {

// x [M, K] (bfloat16 or float32), weight [N, K] bfloat16, bias [N] or none -> [M, N] in x's dtype.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "linear_bf16: x ", x.sizes(),
              " weight ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "linear_bf16: bfloat16 weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto x32 = x.to(at::kFloat).contiguous();
  auto w = weight.contiguous();
  auto out = at::empty({M, N}, x32.options());
  if (M > 0 && N > 0)
    gemm(x32.data_ptr<float>(), M, K, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), N,
                  out.data_ptr<float>(), N);
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_bf16", c10::DispatchKey::CPU, &linear_bf16);
}

}  // namespace customllm
