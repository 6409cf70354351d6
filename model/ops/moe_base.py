"""The MoE experts op's interface: E SwiGLU experts turned once into a backend's weights, then run per step.

Shapes: T tokens, D hidden, I intermediate, E experts, K experts per token, P = T*K (token, expert) pairs.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import torch

from model.ops.linear import LinearBackend
from model.ops.registry import Backend


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """A backend's form of E experts: per expert or stacked, as the backend that built it reads them."""

    num_experts: int
    gate_up: Any  # gate rows then up rows of each expert, [2I, D] per expert
    down: Any  # [D, I] per expert
    linear: LinearBackend | None = None  # the linear backend that processed them, for backends that use one


class ExpertsBackend(Backend, abc.ABC):
    """The interface. `process` runs once after loading; `shared` and `routed` run every step."""

    @abc.abstractmethod
    def process(self, gate_up: list[torch.Tensor], down: list[torch.Tensor],
                linear: LinearBackend) -> ExpertWeights:
        """Checkpoint weights, per expert gate|up [2I, D] and down [D, I] -> this backend's form."""

    @abc.abstractmethod
    def shared(self, experts: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        """Mean of every (shared) expert's output: x [T, D] -> [T, D], x's dtype or float32 (added to later)."""

    @abc.abstractmethod
    def routed(self, experts: ExpertWeights, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        """out [T, D] plus the routing-weighted outputs of each token's experts ids/weights [T, K], in x's dtype."""


def count_experts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] int64 from the routing [T, K], without bincount's host sync on CUDA."""
    flat = ids.flatten()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))


def stack(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per-expert matrices -> one [E, ...] tensor (the graph-safe backends' form)."""
    return torch.stack([w.detach() for w in weights])
