"""DeepSeek-style MoE: a sigmoid router with a bias, top-k routed experts and shared experts.

Shapes: T tokens, D hidden, I intermediate, E routed experts, K experts per token.
One routing for the whole flat batch; how the experts run is the MoE experts backend's (model/ops/moe_*.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.backends import ModelBackends
from model.layers import NOT_PROCESSED
from model.ops.linear import LinearBackend
from model.ops.moe_base import ExpertsBackend, ExpertWeights, count_experts


class Expert(nn.Module):
    """One SwiGLU expert under the checkpoint's names: gate_proj, up_proj [I, D] and down_proj [D, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


def _checkpoint_weights(experts: nn.ModuleList) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per expert: gate|up [2I, D] (fused: one GEMM serves both) and down [D, I]."""
    gate_up, down = [], []
    for expert in experts:
        assert isinstance(expert, Expert)
        gate_up.append(torch.cat((expert.gate_proj.weight, expert.up_proj.weight)))
        down.append(expert.down_proj.weight)
    return gate_up, down


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_shared_experts: int,
                 num_routed_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_routed_experts = num_routed_experts
        self.top_k = top_k
        self.shared_experts = nn.ModuleList(Expert(hidden_size, intermediate_size) for _ in range(num_shared_experts))
        self.routed_experts = nn.ModuleList(Expert(hidden_size, intermediate_size) for _ in range(num_routed_experts))
        self.router = nn.Linear(hidden_size, num_routed_experts, bias=False)
        self.routing_bias = nn.Parameter(torch.zeros(num_routed_experts))
        # Set by process_weights: the backends and the weights they run on.
        self.experts: ExpertsBackend | None = None
        self.linear: LinearBackend | None = None
        self.shared: ExpertWeights | None = None
        self.routed: ExpertWeights | None = None
        self.router_weight: Any = None

    @torch.no_grad()
    def process_weights(self, backends: ModelBackends) -> None:
        """The experts into the experts backend's form, the router into the linear backend's; the checkpoint's
        expert tensors are dropped (the experts are 87% of the seed model)."""
        self.experts, self.linear = backends.experts, backends.linear
        self.shared = backends.experts.process(*_checkpoint_weights(self.shared_experts), backends.linear)
        self.routed = backends.experts.process(*_checkpoint_weights(self.routed_experts), backends.linear)
        self.router_weight = backends.linear.process(self.router.weight)
        del self.shared_experts, self.routed_experts, self.router

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [T, K] and their normalised weights [T, K] (float32)."""
        assert self.linear is not None, NOT_PROCESSED
        # The bias goes in before the sigmoid (added inside the GEMM); selection and weights both use it.
        logits = self.linear.apply(x, self.router_weight, self.routing_bias)
        probs = torch.sigmoid(logits.float())  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor, expert_counts: torch.Tensor | None = None,
                routed_experts: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] -> [T, D]. expert_counts [E], if given, gains the number of tokens each expert received;
        routed_experts [T, K] int32, if given, receives each token's top-k expert ids in the router's order."""
        assert self.experts is not None and self.shared is not None and self.routed is not None, NOT_PROCESSED
        out = self.experts.shared(self.shared, x)
        weights, experts = self.route(x)  # [T, K] each
        # Both written on the device, no host sync (CUDA graphs).
        if expert_counts is not None:
            expert_counts += count_experts(experts, self.num_routed_experts)
        if routed_experts is not None:
            routed_experts.copy_(experts)
        return self.experts.routed(self.routed, x, weights, experts, out)
