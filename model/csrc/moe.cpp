// Routed (or shared) expert MLPs of one MoE layer in one call: no per-expert work in Python.
//
// Shapes: T tokens, D hidden, I intermediate, E experts, K experts per token, n_e tokens of expert e.
// Tokens are grouped per expert here; each expert runs its fused gate|up GEMM [n_e, D] x [2I, D]^T, then one
// pass of silu(gate) * up, then its down GEMM, and adds its routing-weighted rows to the float32 output.
// The GEMMs are gemm.h's (float32 accumulation; bfloat16 weights in its panel layout, float32 ones dense).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "float_rows.h"
#include "gemm.h"

namespace customllm {
namespace {

// act[t][i] = silu(h[t][i]) * h[t][I + i] for h [n, 2I] -> act [n, I] (float32), rows split over the threads.
// sigmoid(g) from e = exp(-|g|) <= 1, which cannot overflow: 1 / (1 + e) for g >= 0, e / (1 + e) below.
void silu_mul(const float* h, int64_t n, int64_t I, float* act) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int64_t iv = I / kLanes * kLanes;
    for (int64_t t = begin; t < end; ++t) {
      const float* g = h + t * 2 * I;
      const float* u = g + I;
      float* a = act + t * I;
      for (int64_t i = 0; i < iv; i += kLanes) {
        const vfloat gv = load(g + i);
        const vfloat e = exp_nonpositive(gv < 0 ? gv : -gv);
        const vfloat r = 1.f / (1.f + e);
        store(a + i, gv * (gv < 0 ? e * r : r) * load(u + i));
      }
      for (int64_t i = iv; i < I; ++i) a[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
}

template <typename W>
void run_experts(const float* x, int64_t T, int64_t D, const int64_t* ids, const float* weights, int64_t K,
                 const std::vector<const W*>& gate_up, const std::vector<const W*>& down, int64_t I, float* out) {
  const int64_t E = static_cast<int64_t>(gate_up.size());
  // Group the (token, slot) pairs per expert, in token order.
  std::vector<std::vector<int64_t>> pairs(E);
  for (int64_t p = 0; p < T * K; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < E, "moe_experts: expert id ", ids[p], " outside 0..", E - 1);
    pairs[ids[p]].push_back(p);
  }
  std::vector<float> xs, h, act, y;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = static_cast<int64_t>(pairs[e].size());
    if (n == 0) continue;
    const int64_t* rows = pairs[e].data();
    xs.resize(n * D);
    h.resize(n * 2 * I);
    act.resize(n * I);
    y.resize(n * D);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) std::copy_n(x + rows[r] / K * D, D, xs.data() + r * D);
    });
    gemm(xs.data(), n, D, gate_up[e], 2 * I, h.data(), 2 * I);
    silu_mul(h.data(), n, I, act.data());
    gemm(act.data(), n, I, down[e], D, y.data(), D);
    // Each thread adds its share of the features of every row (a token's rows never race).
    at::parallel_for(0, D, kLanes, [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < n; ++r) {
        const float w = weights[rows[r]];
        float* o = out + rows[r] / K * D;
        const float* yr = y.data() + r * D;
        for (int64_t d = d0; d < d1; ++d) o[d] += w * yr[d];
      }
    });
  }
}

template <typename W>
std::vector<const W*> pointers(at::TensorList ws) {
  std::vector<const W*> out;
  for (const auto& w : ws) out.push_back(reinterpret_cast<const W*>(w.data_ptr()));
  return out;
}

// x [T, D] (bfloat16 or float32), ids [T, K] int64, weights [T, K] float32; per expert e, gate_up[e] [2I, D]
// and down[e] [D, I], all bfloat16 panels (gemm.h) or all float32 dense; out [T, D] float32 gains
// sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]).
void moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, at::TensorList gate_up,
                 at::TensorList down, const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "moe_experts: x ", x.sizes(), " ids ", ids.sizes(), " weights ", weights.sizes());
  TORCH_CHECK(!gate_up.empty() && gate_up.size() == down.size(), "moe_experts: one gate_up and one down per expert");
  const int64_t T = x.size(0), D = x.size(1), I = gate_up[0].size(0) / 2;
  const auto dtype = gate_up[0].scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "moe_experts: bfloat16 or float32 weights");
  for (size_t e = 0; e < gate_up.size(); ++e) {
    const auto &gu = gate_up[e], &dn = down[e];
    TORCH_CHECK(gu.dim() == 2 && dn.dim() == 2 && gu.size(0) == 2 * I && gu.size(1) == D && dn.size(0) == D &&
                    dn.size(1) == I,
                "moe_experts: expert ", e, " gate_up ", gu.sizes(), " down ", dn.sizes(), " for hidden ", D);
    TORCH_CHECK(gu.scalar_type() == dtype && dn.scalar_type() == dtype && gu.is_contiguous() && dn.is_contiguous(),
                "moe_experts: expert ", e, ": contiguous weights, all of one dtype");
  }
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat, "moe_experts: id/weight dtypes");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == T &&
                  out.size(1) == D,
              "moe_experts: out must be a contiguous float32 [T, D]");
  std::vector<float> widened;
  at::Tensor x32;
  const float* xp = float_rows(x, widened, x32);
  auto id = ids.contiguous();
  auto w = weights.contiguous();
  if (dtype == at::kFloat)
    run_experts(xp, T, D, id.data_ptr<int64_t>(), w.data_ptr<float>(), ids.size(1),
                pointers<float>(gate_up), pointers<float>(down), I, out.data_ptr<float>());
  else
    run_experts(xp, T, D, id.data_ptr<int64_t>(), w.data_ptr<float>(), ids.size(1),
                pointers<uint16_t>(gate_up), pointers<uint16_t>(down), I, out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(customllm, m) {
  m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor[] gate_up, Tensor[] down, Tensor(a!) out) -> ()");
  m.impl("moe_experts", c10::DispatchKey::CPU, &moe_experts);
}

}  // namespace customllm
