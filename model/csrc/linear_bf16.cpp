// bfloat16-weight linear layer for CPUs without native bfloat16 GEMM (AVX2, AVX-512F without BF16), where
// torch's bfloat16 F.linear falls to a slow reference path. The GEMM is gemm.h's, on weights packed into its
// panel layout once at load (pack_panels; unpack_panels gives the dense weight back, bit for bit).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "gemm.h"

namespace customllm {
namespace {

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bits_mut(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// weight [N, K] bfloat16 dense -> the same [N, K] shape in gemm.h's panel layout, and back.
at::Tensor pack_panels_op(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_panels: bfloat16 [N, K] weight");
  auto w = weight.contiguous();
  auto packed = at::empty_like(w);
  customllm::pack_panels(bits(w), w.size(0), w.size(1), bits_mut(packed));
  return packed;
}

at::Tensor unpack_panels_op(const at::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "unpack_panels: contiguous bfloat16 [N, K] panels");
  auto dense = at::empty_like(packed);
  customllm::unpack_panels(bits(packed), packed.size(0), packed.size(1), bits_mut(dense));
  return dense;
}

// x [M, K] (bfloat16 or float32), weight [N, K] bfloat16 panels (pack_panels), bias [N] or none -> [M, N] in
// x's dtype.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "linear_bf16: x ", x.sizes(),
              " weight ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), "linear_bf16: bfloat16 panels");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto x32 = x.to(at::kFloat).contiguous();
  auto out = at::empty({M, N}, x32.options());
  if (M > 0 && N > 0)
    gemm(x32.data_ptr<float>(), M, K, bits(weight), N, out.data_ptr<float>(), N);
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear_bf16", c10::DispatchKey::CPU, &linear_bf16);
  m.def("pack_panels(Tensor weight) -> Tensor");
  m.impl("pack_panels", c10::DispatchKey::CPU, &pack_panels_op);
  m.def("unpack_panels(Tensor packed) -> Tensor");
  m.impl("unpack_panels", c10::DispatchKey::CPU, &unpack_panels_op);
}

}  // namespace customllm
