"""DeepSeek-style MoE with batched dispatch.

Shapes: T tokens, D hidden, E routed experts, K experts per token.
One routing for the whole flat batch; (token, expert) pairs sorted by expert so each expert runs one GEMM
on its contiguous slice; results scattered back with their weights. The shared experts see every token.
"""

from __future__ import annotations

import torch
from torch import nn

from model.layers import StackedExperts


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

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [T, K] and their normalised weights [T, K] (float32)."""
        # The bias goes in before the sigmoid; selection and weights both use the biased probabilities.
        probs = torch.sigmoid((self.router(x) + self.routing_bias).float())  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor, expert_counts: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] -> [T, D]. expert_counts [E], if given, gains the number of tokens each expert received."""
        out = self.shared_experts.expert_forward(0, x)
        for s in range(1, self.shared_experts.num_experts):
            out = out + self.shared_experts.expert_forward(s, x)
        if self.shared_experts.num_experts > 1:
            out = out / self.shared_experts.num_experts

        weights, experts = self.route(x)
        flat_experts = experts.flatten()  # [T*K]
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # token index of each sorted (token, expert) pair
        sorted_weights = weights.flatten()[order].to(x.dtype)
        counts = torch.bincount(flat_experts, minlength=self.num_routed_experts)  # [E]
        if expert_counts is not None:
            expert_counts += counts
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            idx = token_of[start:start + count]
            y = self.routed_experts.expert_forward(expert, x.index_select(0, idx))  # [count, D]
            out.index_add_(0, idx, y * sorted_weights[start:start + count, None])
            start += count
        return out
