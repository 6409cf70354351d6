// One decoder layer of an all-decode step (one new token per sequence) in one call: what model/model.py's
// DecoderLayer runs through its modules (attention.py's absorbed decode, moe.py), op for op and in the same
// order. What it saves is Python: at decode sizes each of the ~150 calls a layer makes from Python costs more than
// its work (docs/performance.md).
//
// Shapes: B sequences (one token each), D hidden, H heads, N no-position width, R rope width, Dh = N + R,
// L latent, F = L + H*R cache entry, S shared experts, E routed experts, K experts per token.
// The kernels are the extension's own ops (linear_bf16, rms_norm, mla_decode, moe_experts), called through the
// dispatcher; the small ops are aten's, except the two absorption products, which are loops here (torch's bmm
// of 12 one-row products takes ~60 us a call, their work ~10 us): float32 as in the module path, summed in
// another order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

#include "vec.h"

namespace customllm {
namespace {

using at::Tensor;

// How the layer's linear weights and norms are held (model/ops/decode_layer.py passes the matching kind).
enum LinearKind : int64_t { kPanels = 0, kDense = 1 };  // cpp-bf16's panels, plain's dense [out, in]
enum NormKind : int64_t { kNormCpp = 0, kNormTorch = 1 };

// The weights list, in this order (model/ops/decode_layer.py builds it once per layer).
enum Weight { kInNorm, kWIn, kWQ, kWK, kWVT, kOProj, kPostNorm, kRouter, kRoutingBias, kNumWeights };

Tensor linear(int64_t kind, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  if (kind == kDense) return at::linear(x, w, bias);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("customllm::linear_bf16", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>();
  return op.call(x, w, bias);
}

Tensor rms_norm(int64_t kind, const Tensor& x, const Tensor& w, double eps) {
  if (kind == kNormTorch) return w * at::rms_norm(x, {x.size(-1)}, std::nullopt, eps);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("customllm::rms_norm", "")
                       .typed<Tensor(const Tensor&, const Tensor&, double)>();
  return op.call(x, w, eps);
}

// model/layers.py apply_rope_: x [B, H, R] (a strided view) rotated in place, in float32, rounded once.
void rope_(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const Tensor x32 = x.to(at::kFloat);
  Tensor out = x32 * cos;
  out.narrow(-1, 0, half).addcmul_(x32.narrow(-1, half, half), sin.narrow(-1, 0, half), -1.0);
  out.narrow(-1, half, half).addcmul_(x32.narrow(-1, 0, half), sin.narrow(-1, half, half));
  x.copy_(out);
}

void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, at::TensorList gate_up,
                 at::TensorList down, const Tensor& out) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("customllm::moe_experts", "")
                       .typed<void(const Tensor&, const Tensor&, const Tensor&, at::TensorList, at::TensorList,
                                   const Tensor&)>();
  op.call(x, ids, weights, gate_up, down, out);
}

// out[b][h] = sum_i x[b][h][i] * w[h][i][:] for x [B, H, I] (any strides, float32), w [H, I, J] float32
// contiguous -> out [B, H, J] float32 contiguous: a row of w per input value, J-wide vector FMAs.
Tensor per_head_product(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                  w.size(0) == x.size(1) && w.size(1) == x.size(2),
              "decode_layer: per-head product of ", x.sizes(), " and ", w.sizes());
  const int64_t B = x.size(0), H = x.size(1), I = x.size(2), J = w.size(2), jv = J / kLanes * kLanes;
  Tensor out = at::empty({B, H, J}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), si = x.stride(2);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* xr = xp + b * sb + h * sh;
      const float* wh = wp + h * I * J;
      float* o = op + bh * J;
      for (int64_t j = 0; j < jv; j += kLanes) {
        vfloat acc{};
        for (int64_t i = 0; i < I; ++i) acc += splat(xr[i * si]) * load(wh + i * J + j);
        store(o + j, acc);
      }
      for (int64_t j = jv; j < J; ++j) {
        float acc = 0.f;
        for (int64_t i = 0; i < I; ++i) acc += xr[i * si] * wh[i * J + j];
        o[j] = acc;
      }
    }
  });
  return out;
}

// model/attention.py forward + _decode with the cpp MLA decode backend: x [B, D] normalised -> [B, D].
Tensor attention(int64_t kind, const Tensor& h, const Tensor& cos, const Tensor& sin, at::TensorList w,
                 const Tensor& cache, const Tensor& slots, const Tensor& tables, const Tensor& lens, int64_t H,
                 int64_t N, int64_t R, int64_t L, double scale, int64_t num_splits) {
  static auto mla = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("customllm::mla_decode", "")
                        .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      double, int64_t)>();
  const int64_t B = h.size(0), Dh = N + R, F = L + H * R;
  const Tensor fused = linear(kind, h, w[kWIn], std::nullopt);  // [B, F + L]
  const Tensor entry = fused.narrow(1, 0, F);                     // [B, F]: c_kv | k_rope
  rope_(entry.narrow(1, L, H * R).view({B, H, R}), cos, sin);
  const Tensor q = linear(kind, fused.narrow(1, F, L), w[kWQ], std::nullopt).view({B, H, Dh});  // q_nope | q_rope
  rope_(q.narrow(2, N, R), cos, sin);
  cache.view({-1, cache.size(-1)}).index_copy_(0, slots, entry);
  // The cpp MLA decode's compute dtype is float32: W_k [H, N, L] and W_v^T [H, L, Dh] are float32.
  const Tensor q_lat = per_head_product(q.narrow(2, 0, N).to(at::kFloat), w[kWK]);  // [B, H, L]
  const Tensor mixed = mla.call(q_lat, q.narrow(2, N, R).to(at::kFloat), cache, tables, lens, scale, num_splits);
  const Tensor out = per_head_product(mixed, w[kWVT]).to(q.scalar_type());  // [B, H, Dh]
  return linear(kind, out.reshape({B, H * Dh}), w[kOProj], std::nullopt);
}

// model/moe.py forward with the cpp experts backend: h [B, D] normalised -> [B, D] in h's dtype.
Tensor moe(int64_t kind, const Tensor& h, at::TensorList w, at::TensorList shared_gate_up, at::TensorList shared_down,
           at::TensorList routed_gate_up, at::TensorList routed_down, const std::optional<Tensor>& expert_counts,
           int64_t top_k) {
  const int64_t B = h.size(0), S = static_cast<int64_t>(shared_gate_up.size());
  const Tensor acc = at::zeros(h.sizes(), h.options().dtype(at::kFloat));  // [B, D]: one rounding at the end
  moe_experts(h, at::arange(S).expand({B, S}), at::full({B, S}, 1.0 / static_cast<double>(S)), shared_gate_up,
              shared_down, acc);
  const Tensor probs = at::sigmoid(linear(kind, h, w[kRouter], w[kRoutingBias]).to(at::kFloat));  // [B, E]
  auto [weights, ids] = probs.topk(top_k, -1);  // [B, K] each
  weights = weights / weights.sum(-1, true);
  if (expert_counts.has_value()) {
    const Tensor flat = ids.flatten();
    expert_counts->add_(at::zeros_like(*expert_counts).scatter_add_(0, flat, at::ones_like(flat)));
  }
  moe_experts(h, ids, weights, routed_gate_up, routed_down, acc);
  return acc.to(h.scalar_type());
}

// x [B, D] -> [B, D]: x + attention(norm(x)), then + moe(norm(.)). dims = (H, N, R, L, top_k, mla num_splits,
// linear kind, norm kind); params = (eps, attention scale).
Tensor decode_layer(const Tensor& x, const Tensor& cos, const Tensor& sin, at::TensorList weights,
                    at::TensorList shared_gate_up, at::TensorList shared_down, at::TensorList routed_gate_up,
                    at::TensorList routed_down, const Tensor& cache, const Tensor& slots, const Tensor& tables,
                    const Tensor& lens, const std::optional<Tensor>& expert_counts, at::IntArrayRef dims,
                    at::ArrayRef<double> params) {
  TORCH_CHECK(weights.size() == kNumWeights && dims.size() == 8 && params.size() == 2,
              "decode_layer: ", weights.size(), " weights, ", dims.size(), " dims, ", params.size(), " params");
  TORCH_CHECK(x.dim() == 2 && tables.size(0) == x.size(0) && slots.size(0) == x.size(0),
              "decode_layer: one new token per sequence: x ", x.sizes(), " tables ", tables.sizes());
  const int64_t kind = dims[6], norm = dims[7];
  const double eps = params[0];
  const Tensor attn = attention(kind, rms_norm(norm, x, weights[kInNorm], eps), cos, sin, weights, cache, slots,
                                tables, lens, dims[0], dims[1], dims[2], dims[3], params[1], dims[5]);
  const Tensor y = x + attn;
  return y + moe(kind, rms_norm(norm, y, weights[kPostNorm], eps), weights, shared_gate_up, shared_down,
                 routed_gate_up, routed_down, expert_counts, dims[4]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) {
  m.def("decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, Tensor[] shared_gate_up, "
        "Tensor[] shared_down, Tensor[] routed_gate_up, Tensor[] routed_down, Tensor(a!) cache, Tensor slots, "
        "Tensor tables, Tensor lens, Tensor(b!)? expert_counts, int[] dims, float[] params) -> Tensor");
  m.impl("decode_layer", c10::DispatchKey::CPU, &decode_layer);
}

}  // namespace customllm
