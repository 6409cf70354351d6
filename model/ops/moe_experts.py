"""The expert MLPs of an MoE layer: backends chosen once at load.

Shapes: T tokens, D hidden, I intermediate, E experts, K experts per token, P = T*K (token, expert) pairs.

`TorchExperts` (every device, dtype and linear backend; the oracle): pairs sorted by expert, one gathered
input, one fused gate|up GEMM, silu * up and one down GEMM per expert through the linear backend, then one
index_add. `CppExperts` (CPU; model/csrc/moe.cpp): the whole layer's experts in one extension call, grouping,
SiLU*mul pass and weighted accumulation in float32 included, so no Python runs per expert. It runs on the
weights of the cpp-bf16 linear backend (bfloat16 panels) or on dense float32 ones; not next to packed oneDNN
(the better path on CPUs with native bfloat16 GEMM) or int8, nor on dense bfloat16 (the plain backend, asked
for by name: the oracle).
"""

from __future__ import annotations

import copy
import functools
import logging

import torch

from model.layers import StackedExperts
from model.ops.linear import CppBF16Linear, PlainLinear

logger = logging.getLogger(__name__)


class TorchExperts:
    name = "torch"

    def shared(self, experts: StackedExperts, x: torch.Tensor) -> torch.Tensor:
        """Mean of every shared expert's output: x [T, D] -> [T, D] in x's dtype."""
        out = experts.expert_forward(0, x)
        for s in range(1, experts.num_experts):
            out = out + experts.expert_forward(s, x)
        return out / experts.num_experts if experts.num_experts > 1 else out

    def routed(self, experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        """out [T, D] (x's dtype) plus the routing-weighted outputs of each token's experts ids/weights [T, K]."""
        flat = ids.flatten()  # [P]
        k = ids.shape[1]
        if x.shape[0] == 1:
            # One token (batch-1 decode): its K experts straight from the routing, no sort, gather or scatter.
            for expert, weight in zip(flat.tolist(), weights.flatten().tolist(), strict=True):
                out.add_(experts.expert_forward(expert, x), alpha=weight)
            return out
        counts = torch.bincount(flat, minlength=experts.num_experts).tolist()  # [E]
        order = flat.argsort(stable=True)  # [P]
        token_of = order // k  # [P]: the token of each sorted pair
        x_sorted = x.index_select(0, token_of)  # [P, D], grouped by expert
        ys = torch.empty_like(x_sorted)  # [P, D]
        start = 0
        for expert, count in enumerate(counts):
            if count:
                ys[start:start + count] = experts.expert_forward(expert, x_sorted[start:start + count])
                start += count
        ys *= weights.flatten()[order, None].to(x.dtype)
        return out.index_add_(0, token_of, ys)


class CppExperts(TorchExperts):
    name = "cpp"

    def shared(self, experts: StackedExperts, x: torch.Tensor) -> torch.Tensor:
        # Float32 until the routed experts are added too: one rounding for the whole MoE output.
        t, s = x.shape[0], experts.num_experts
        out = x.new_zeros(x.shape, dtype=torch.float32)  # [T, D]
        ids = torch.arange(s).expand(t, s)  # [T, S]: every token to every shared expert, weight 1/S
        torch.ops.customllm.moe_experts(x, ids, torch.full((t, s), 1.0 / s), *experts.prepared_weights(), out)
        return out

    def routed(self, experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        acc = out if out.dtype == torch.float32 else out.float()
        torch.ops.customllm.moe_experts(x, ids, weights, *experts.prepared_weights(), acc)
        return acc.to(x.dtype)


def kernel_weights_backend(dtype: torch.dtype) -> PlainLinear | None:
    """The linear backend whose prepared expert weights the C++ kernel reads in this dtype (bfloat16 panels,
    dense float32), or None."""
    backend = {torch.bfloat16: CppBF16Linear, torch.float32: PlainLinear}.get(dtype)
    return None if backend is None else backend()


def _self_check(dtype: torch.dtype) -> bool:
    """The kernel against the torch path in float32 on the same (rounded) weights, on a small case."""
    g = torch.Generator().manual_seed(0)
    oracle_experts = StackedExperts(3, 16, 8)
    with torch.no_grad():
        oracle_experts.gate_up.copy_(torch.randn(oracle_experts.gate_up.shape, generator=g) / 4)
        oracle_experts.down.copy_(torch.randn(oracle_experts.down.shape, generator=g) / 4)
        experts = copy.deepcopy(oracle_experts).to(dtype)
        oracle_experts.to(dtype).float()  # the oracle sees the rounded weights
        backend = kernel_weights_backend(dtype)
        assert backend is not None, dtype
        experts.prepare(backend)
        x = torch.randn(5, 16, generator=g).to(dtype)
        ids = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0], [1, 2]])
        weights = torch.rand(5, 2, generator=g)
        oracle, fast = TorchExperts(), CppExperts()
        want = oracle.routed(oracle_experts, x.float(), weights, ids, oracle.shared(oracle_experts, x.float()))
        got = fast.routed(experts, x, weights, ids, fast.shared(experts, x)).float()
    return torch.allclose(got, want, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


BACKENDS = ("auto", "torch", "cpp", "grouped-mm", "dense-masked")


@functools.cache
def select_experts(device: torch.device, dtype: torch.dtype, layout: str, name: str = "auto") -> TorchExperts:
    """The experts backend for expert weights prepared in `layout` ("auto": the C++ path where it loads and can
    read them), logged once."""
    from model.ops import cpu_extension  # imported here: `python -m model.ops.cpu_extension` imports model first

    assert name in BACKENDS, f"unknown MoE experts backend {name!r}, expected one of {BACKENDS}"
    dense_weights = layout == "dense"
    if name in ("grouped-mm", "dense-masked") or (name == "auto" and device.type == "cuda" and dense_weights):
        # CUDA: the graph-safe backends (decode steps run as CUDA graphs), on the plain backend's dense weights.
        # Without them (int8 weights on CUDA) the torch path runs; its host syncs then keep decode eager.
        from model.ops.moe_grouped import select_graph_safe_experts

        if not dense_weights:
            raise ValueError(f"MoE experts backend {name} needs the dense stacked expert weights")
        return select_graph_safe_experts(device, dtype, "auto" if name == "auto" else name)
    readable = kernel_weights_backend(dtype)
    usable = cpu_extension.kernel_usable("MoE experts", name, device, dtype, _self_check,
                                         possible=readable is not None and readable.weight_layout == layout)
    backend = CppExperts() if usable else TorchExperts()
    logger.info("MoE experts backend for %s %s: %s", device, dtype, backend.name)
    return backend
