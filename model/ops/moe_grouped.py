"""Graph-safe MoE experts backends: fixed shapes from routing to combine, nothing read back to the host.

Shapes: T tokens, D hidden, I intermediate, E experts, K experts per token, P = T*K (token, expert) pairs.

A CUDA graph replays fixed shapes and cannot wait for the host, so the eager dispatch (bincount, `.tolist()` of
the counts, one GEMM per non-empty expert) cannot be captured. `GroupedExperts` sorts the P pairs by expert,
turns the counts into group offsets on the device and runs `torch._grouped_mm` over all groups at once.
`DenseMaskedExperts` runs every expert on every token, weighted by the token's routing weight for it (0 off
route): E/K times the FLOPs, the fallback where `_grouped_mm` is not a real kernel. Both hold the experts stacked
(gate_up [E, 2I, D], down [E, D, I]) and combine a token's K outputs without atomics (a gather back to token
order, then a sum over K), so a replay gives the eager step's bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.ops.linear import LinearBackend
from model.ops.moe_base import ExpertsBackend, ExpertWeights, count_experts, stack
from model.ops.registry import Target

_NOT_ON_CPU = "for CUDA graphs (CPU runs eagerly)"


def _expert(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): x [T, D] -> [T, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return F.linear(F.silu(gate) * up, down)


class _StackedExperts(ExpertsBackend):
    """Shared by both: the stacked dense weights, and the shared experts as a fixed loop."""

    quantizations = frozenset({"none"})

    @classmethod
    def auto_skip(cls, target: Target) -> str | None:
        return _NOT_ON_CPU if target.device.type == "cpu" else None

    def process(self, gate_up: list[torch.Tensor], down: list[torch.Tensor],
                linear: LinearBackend) -> ExpertWeights:
        return ExpertWeights(len(gate_up), stack(gate_up), stack(down))

    def shared(self, experts: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        out = _expert(experts.gate_up[0], experts.down[0], x)
        for s in range(1, experts.num_experts):
            out = out + _expert(experts.gate_up[s], experts.down[s], x)
        return out / experts.num_experts if experts.num_experts > 1 else out


class DenseMaskedExperts(_StackedExperts):
    """Every expert on every token, weighted by the routing (0 off-route)."""

    name = "dense-masked"

    def routed(self, experts: ExpertWeights, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(x.shape[0], experts.num_experts, dtype=weights.dtype, device=x.device)
        dense.scatter_add_(1, ids, weights)  # [T, E]: the weight token t gives expert e
        routed = torch.zeros_like(x)
        for e in range(experts.num_experts):
            routed += _expert(experts.gate_up[e], experts.down[e], x) * dense[:, e, None].to(x.dtype)
        return out + routed


class GroupedExperts(_StackedExperts):
    """Pairs sorted by expert, one grouped GEMM per projection over all experts' groups."""

    name = "grouped-mm"

    @classmethod
    def requirement(cls, target: Target) -> str | None:
        # NOTE: on CUDA below sm90, or outside bf16, _grouped_mm is a host-driven loop over the groups, not a
        # kernel a CUDA graph can be trusted to capture.
        if not hasattr(torch, "_grouped_mm"):
            return "this torch has no _grouped_mm"
        if target.device.type == "cuda" and (target.dtype != torch.bfloat16
                                             or torch.cuda.get_device_capability(target.device) < (9, 0)):
            return "_grouped_mm is a real kernel only in bfloat16 on sm90+"
        return None

    def routed(self, experts: ExpertWeights, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        gate_up, down = experts.gate_up, experts.down  # [E, 2I, D], [E, D, I]
        t, k = ids.shape
        order = ids.flatten().argsort(stable=True)  # [P]: pairs grouped by expert
        offsets = count_experts(ids, experts.num_experts).cumsum(0).to(torch.int32)  # [E]: end of each group
        x_sorted = x.index_select(0, order // k)  # [P, D]
        gate, up = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [P, I]
        y_sorted = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)  # [P, D]
        y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(t, k, -1)  # [T, K, D], pair order
        return out + (y * weights[..., None].to(x.dtype)).sum(dim=1)
