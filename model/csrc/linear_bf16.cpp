// bfloat16-weight linear layer for CPUs without native bfloat16 GEMM (AVX2, AVX-512F without BF16), where
// torch's bfloat16 F.linear falls to a slow reference path. The GEMM is gemm.h's, on weights packed into its
// panel layout once at load (pack_panels; unpack_panels gives the dense weight back, bit for bit).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "float_rows.h"
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

// x [M, K] (bfloat16 or float32; rows may be strided), weight [N, K] bfloat16 panels (pack_panels), bias [N] or
// none -> [M, N] in x's dtype: float32 sums, the bias added in float32, one rounding. A bfloat16 x is widened
// and the output rounded here, not by aten conversions: at decode sizes their dispatch (~10 us each, four per
// call) costs more than the work.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "linear_bf16: x ", x.sizes(),
              " weight ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), "linear_bf16: bfloat16 panels");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "linear_bf16: bias ",
              bias.has_value() ? bias->sizes() : at::IntArrayRef{}, " for ", weight.size(0), " outputs");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  std::vector<float> widened;
  at::Tensor x32;
  const float* xp = float_rows(x, widened, x32);
  const auto b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (!bf16) {
    auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
    if (M > 0 && N > 0) gemm(xp, M, K, bits(weight), N, out.data_ptr<float>(), N);
    if (bp != nullptr) out.add_(b32);
    return out.to(x.scalar_type());
  }
  std::vector<float> acc(M * N);
  if (M > 0 && N > 0) gemm(xp, M, K, bits(weight), N, acc.data(), N);
  auto out = at::empty({M, N}, x.options());
  uint16_t* op = bits_mut(out);
  const int64_t nv = N / kLanes * kLanes;
  at::parallel_for(0, M, rows_per_task(N), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* a = acc.data() + m * N;
      uint16_t* o = op + m * N;
      for (int64_t n = 0; n < nv; n += kLanes)
        store_bf16(o + n, round_bf16(bp == nullptr ? load(a + n) : load(a + n) + load(bp + n)));
      for (int64_t n = nv; n < N; ++n) o[n] = float_to_bf16(bp == nullptr ? a[n] : a[n] + bp[n]);
    }
  });
  return out;
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
