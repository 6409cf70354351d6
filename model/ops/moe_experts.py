"""The MoE experts op (`--moe-backend`): the eager backends, and the op with every backend in "auto" order.

Shapes: T tokens, D hidden, I intermediate, E experts, K experts per token, P = T*K (token, expert) pairs.

`TorchExperts` (every device, dtype and linear backend; the oracle): pairs sorted by expert, one gathered input,
one fused gate|up GEMM, silu * up and one down GEMM per expert through the linear backend, then one index_add.
`CppExperts` (CPU bfloat16/float32; model/csrc/moe.cpp): the layer's experts in one extension call, grouping,
SiLU*mul and weighted accumulation in float32 included, on bfloat16 panels or dense float32 weights. CUDA's
graph-safe backends are in model/ops/moe_grouped.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.ops.linear import LinearBackend, PlainLinear
from model.ops.moe_base import ExpertsBackend, ExpertWeights
from model.ops.moe_grouped import DenseMaskedExperts, GroupedExperts
from model.ops.registry import MakeTensor, Op, Target


class TorchExperts(ExpertsBackend):
    name = "torch"

    def process(self, gate_up: list[torch.Tensor], down: list[torch.Tensor],
                linear: LinearBackend) -> ExpertWeights:
        return ExpertWeights(len(gate_up), [linear.process(w) for w in gate_up], [linear.process(w) for w in down],
                             linear)

    @staticmethod
    def _expert(experts: ExpertWeights, e: int, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) for expert e: x [T, D] -> [T, D]."""
        linear = experts.linear
        assert linear is not None, "TorchExperts.process builds these weights"
        gate, up = linear.apply(x, experts.gate_up[e]).chunk(2, dim=-1)  # [T, I] each
        return linear.apply(F.silu(gate) * up, experts.down[e])

    def shared(self, experts: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        out = self._expert(experts, 0, x)
        for s in range(1, experts.num_experts):
            out = out + self._expert(experts, s, x)
        return out / experts.num_experts if experts.num_experts > 1 else out

    def routed(self, experts: ExpertWeights, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten()  # [P]
        k = ids.shape[1]
        if x.shape[0] == 1:
            # One token (batch-1 decode): its K experts straight from the routing, no sort, gather or scatter.
            for expert, weight in zip(flat.tolist(), weights.flatten().tolist(), strict=True):
                out.add_(self._expert(experts, expert, x), alpha=weight)
            return out
        counts = torch.bincount(flat, minlength=experts.num_experts).tolist()  # [E]
        order = flat.argsort(stable=True)  # [P]
        token_of = order // k  # [P]: the token of each sorted pair
        x_sorted = x.index_select(0, token_of)  # [P, D], grouped by expert
        ys = torch.empty_like(x_sorted)  # [P, D]
        start = 0
        for expert, count in enumerate(counts):
            if count:
                ys[start:start + count] = self._expert(experts, expert, x_sorted[start:start + count])
                start += count
        ys *= weights.flatten()[order, None].to(x.dtype)
        return out.index_add_(0, token_of, ys)


class CppExperts(ExpertsBackend):
    name = "cpp"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float32})
    quantizations = frozenset({"none"})
    needs_extension = True

    @classmethod
    def auto_skip(cls, target: Target) -> str | None:
        if target.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "oneDNN's bfloat16 GEMM (the linear backend) serves this CPU"
        return None

    def process(self, gate_up: list[torch.Tensor], down: list[torch.Tensor],
                linear: LinearBackend) -> ExpertWeights:
        # The kernel reads bfloat16 weights in the panel layout of model/csrc/gemm.h, float32 ones dense.
        if gate_up[0].dtype == torch.bfloat16:
            pack = torch.ops.customllm.pack_panels
            return ExpertWeights(len(gate_up), [pack(w.detach()) for w in gate_up], [pack(w.detach()) for w in down])
        return ExpertWeights(len(gate_up), [w.detach().contiguous() for w in gate_up],
                             [w.detach().contiguous() for w in down])

    def shared(self, experts: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        # Float32 until the routed experts are added too: one rounding for the whole MoE output.
        t, s = x.shape[0], experts.num_experts
        out = x.new_zeros(x.shape, dtype=torch.float32)  # [T, D]
        ids = torch.arange(s).expand(t, s)  # [T, S]: every token to every shared expert, weight 1/S
        torch.ops.customllm.moe_experts(x, ids, torch.full((t, s), 1.0 / s), experts.gate_up, experts.down, out)
        return out

    def routed(self, experts: ExpertWeights, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        acc = out if out.dtype == torch.float32 else out.float()
        torch.ops.customllm.moe_experts(x, ids, weights, experts.gate_up, experts.down, acc)
        return acc.to(x.dtype)


def _case(backend: ExpertsBackend, make: MakeTensor) -> torch.Tensor:
    """4 experts, 6 tokens, top-2, groups of 3, 0, 5 and 4 pairs (an empty one); D=64, I=32 (sm90's alignment)."""
    num_experts, hidden, inter = 4, 64, 32
    gate_up = [make(2 * inter, hidden, scale=0.3) for _ in range(num_experts)]
    down = [make(hidden, inter, scale=0.3) for _ in range(num_experts)]
    x = make(6, hidden)
    ids = torch.tensor([[0, 2], [2, 0], [3, 0], [2, 3], [2, 3], [3, 2]], device=x.device)
    weights = make(6, 2).abs().float()
    experts = backend.process(gate_up, down, PlainLinear())
    return backend.routed(experts, x, weights, ids, backend.shared(experts, x))


MOE_EXPERTS: Op[ExpertsBackend] = Op(
    "MoE experts", "--moe-backend", (GroupedExperts, DenseMaskedExperts, CppExperts, TorchExperts), _case,
    {torch.float32: (1e-4, 1e-3), torch.bfloat16: (5e-2, 2e-2), torch.float16: (5e-2, 2e-2)})
