"""Graph-safe routed experts: fixed shapes from routing to combine, nothing read back to the host.

Shapes: T tokens, D hidden, I intermediate, E routed experts, K experts per token, P = T*K (token, expert) pairs.

A CUDA graph replays fixed shapes and cannot wait for the host, so the eager dispatch (model/moe.py: bincount,
`.tolist()` of the counts, one GEMM per non-empty expert slice) cannot be captured. Two fixed-shape backends:
`GroupedExperts` sorts the P pairs by expert (argsort of a [P] tensor), turns the counts into group offsets on the
device and runs `torch._grouped_mm` over all groups at once (a real grouped GEMM on sm90; CPU has a reference
implementation). `DenseMaskedExperts` runs every expert on every token and weights each output by the token's routing
weight for that expert (0 when not routed there): E/K times the FLOPs, but trivially right, so it is the oracle of
the grouped path and the fallback where `_grouped_mm` is not usable.
Both are backends of model/ops/moe_experts.py (CUDA's, chosen there) and need the dense stacked weights; both
combine the K outputs of a token without atomics (a gather back to token order, then a sum over K), so a
replay gives the same bits as the eager run of the same step.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from model.layers import StackedExperts
from model.ops.moe_experts import TorchExperts

logger = logging.getLogger(__name__)


def count_experts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] int64 from the routing [T, K], without bincount's host sync on CUDA."""
    flat = experts.flatten()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))


class DenseMaskedExperts(TorchExperts):
    """Every expert on every token, weighted by the routing (0 off-route): the oracle and the safe fallback."""

    name = "dense-masked"

    def routed(self, experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        """out [T, D] plus the routed experts' outputs for weights/ids [T, K]; dense stacked weights only."""
        gate_up, down = experts.gate_up, experts.down  # [E, 2I, D], [E, D, I]
        # dense[t, e]: the weight token t gives expert e
        dense = torch.zeros(x.shape[0], gate_up.shape[0], dtype=weights.dtype, device=x.device)
        dense.scatter_add_(1, ids, weights)  # [T, E]
        routed = torch.zeros_like(x)
        for e in range(gate_up.shape[0]):
            gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)  # [T, I] each
            routed += F.linear(F.silu(gate) * up, down[e]) * dense[:, e, None].to(x.dtype)
        return out + routed


class GroupedExperts(DenseMaskedExperts):
    """Pairs sorted by expert, one grouped GEMM per projection over all experts' groups."""

    name = "grouped-mm"

    def routed(self, experts: StackedExperts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        gate_up, down = experts.gate_up, experts.down
        t, k = ids.shape
        order = ids.flatten().argsort(stable=True)  # [P]: pairs grouped by expert
        offsets = count_experts(ids, gate_up.shape[0]).cumsum(0).to(torch.int32)  # [E]: end of each group
        x_sorted = x.index_select(0, order // k)  # [P, D]
        gate, up = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [P, I]
        y_sorted = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)  # [P, D]
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(t, k, -1)  # [T, K, D], pair order
        return out + (y * weights[..., None].to(x.dtype)).sum(dim=1)


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """The grouped path against the dense oracle on a small case with an empty expert."""
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, num_experts = 6, 64, 32, 4  # dims a multiple of 16: the sm90 kernel's alignment
    experts = StackedExperts(num_experts, hidden, inter)
    with torch.no_grad():
        experts.gate_up.copy_(0.3 * torch.randn(experts.gate_up.shape, generator=g))
        experts.down.copy_(0.3 * torch.randn(experts.down.shape, generator=g))
    experts = experts.to(device, dtype)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    # Groups of 3, 0, 5 and 4 pairs: an empty one and sizes that are not multiples of anything.
    ids = torch.tensor([[0, 2], [2, 0], [3, 0], [2, 3], [2, 3], [3, 2]], device=device)
    weights = torch.rand(tokens, 2, generator=g).to(device)
    with torch.no_grad():
        want = DenseMaskedExperts().routed(experts, x, weights, ids, torch.zeros_like(x)).float()
        got = GroupedExperts().routed(experts, x, weights, ids, torch.zeros_like(x)).float()
    return torch.allclose(got, want, atol=0.05 if dtype != torch.float32 else 1e-5, rtol=0.02)


@functools.cache
def select_graph_safe_experts(device: torch.device, dtype: torch.dtype, name: str = "auto") -> TorchExperts:
    """grouped-mm where torch._grouped_mm runs without a host sync (CUDA sm90+ in bf16, CPU), else dense-masked.

    NOTE: on CUDA below sm90, or outside bf16, torch's _grouped_mm takes a fallback path (a loop over the groups
    driven from the host), not a kernel a CUDA graph can be trusted to capture; dense-masked is used there.
    """
    assert name in ("auto", "grouped-mm", "dense-masked"), f"unknown graph-safe MoE backend {name!r}"
    usable = name != "dense-masked" and hasattr(torch, "_grouped_mm")
    if usable and device.type == "cuda":
        usable = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    if usable:
        try:
            usable = _self_check(device, dtype)
        except RuntimeError as exc:
            logger.warning("torch._grouped_mm unusable on %s %s (%s)", device, dtype, exc)
            usable = False
    if name == "grouped-mm" and not usable:
        raise ValueError(f"graph-safe MoE backend grouped-mm is not usable on {device} with {dtype}")
    backend = GroupedExperts() if usable else DenseMaskedExperts()
    logger.info("MoE experts backend for %s %s: %s (graph-safe)", device, dtype, backend.name)
    return backend
