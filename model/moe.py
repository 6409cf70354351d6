"""DeepSeek-style MoE with batched dispatch.

Shapes: T tokens, D hidden, E routed experts, K experts per token, P = T*K (token, expert) pairs.
One routing for the whole flat batch; pairs sorted by expert so each expert runs one GEMM on its contiguous
slice of a single gathered input; the weighted outputs go back to their tokens with one index_add.
The shared experts see every token.
"""

from __future__ import annotations

import torch
from torch import nn

from model.layers import StackedExperts
from model.ops.linear import PlainLinear
from model.ops.moe_experts import TorchExperts, select_experts
from model.ops.moe_grouped import count_experts


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_shared_experts: int,
                 num_routed_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_routed_experts = num_routed_experts
        self.top_k = top_k
        self.shared_experts = StackedExperts(num_shared_experts, hidden_size, intermediate_size)
        self.routed_experts = StackedExperts(num_routed_experts, hidden_size, intermediate_size)
        self.router = nn.Linear(hidden_size, num_routed_experts, bias=False)
        self.routing_bias = nn.Parameter(torch.zeros(num_routed_experts))

    def prepare(self, backend: PlainLinear) -> None:
        self.shared_experts.prepare(backend)
        self.routed_experts.prepare(backend)
        self._router = (backend, backend.prepare(self.router.weight))
        weight = self.router.weight
        self._experts = select_experts(weight.device, weight.dtype, backend.weight_layout)

    def unprepare(self) -> None:
        self.shared_experts.unprepare()
        self.routed_experts.unprepare()
        self._router = None
        self._experts = TorchExperts()

    _router: tuple[PlainLinear, torch.Tensor] | None = None  # (backend, prepared router weight)
    _experts: TorchExperts = TorchExperts()  # how the expert MLPs run (model/ops/moe_experts.py)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [T, K] and their normalised weights [T, K] (float32)."""
        # The bias goes in before the sigmoid; selection and weights both use the biased probabilities.
        if self._router is None:
            logits = self.router(x) + self.routing_bias
        else:
            backend, weight = self._router
            logits = backend.linear(x, weight, self.routing_bias)  # bias added inside the GEMM
        probs = torch.sigmoid(logits.float())  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor, expert_counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] -> [T, D]. expert_counts [E], if given, gains the number of tokens each expert received."""
        out = self._experts.shared(self.shared_experts, x)
        weights, experts = self.route(x)  # [T, K] each
        if expert_counts is not None:
            expert_counts += count_experts(experts, self.num_routed_experts)  # no host sync (CUDA graphs)
        return self._experts.routed(self.routed_experts, x, weights, experts, out)
