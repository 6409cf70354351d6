"""Small building blocks: RMSNorm, rotary embedding and a linear layer whose weight its backend processes.

Shapes: T tokens, D hidden, R rope dim.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from model.backends import ModelBackends
from model.ops.linear import LinearBackend
from model.ops.rms_norm import RMSNormBackend

NOT_PROCESSED = "process_weights() first: forward runs on the weights the backends made of the checkpoint's"


class ProcessesWeights(Protocol):
    def process_weights(self, backends: ModelBackends) -> None:
        """Turn this module's checkpoint tensors into what its backends run on, once, after loading."""


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.backend: RMSNormBackend | None = None  # how it runs (model/ops/rms_norm.py)

    def process_weights(self, backends: ModelBackends) -> None:
        self.backend = backends.rms_norm  # the weight is used as loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.backend is not None, NOT_PROCESSED
        return self.backend(x, self.weight, self.eps)  # normalised in float32, rounded, then the weight


def rope_cos_sin(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, R] (float32) for the half-split rotary convention, broadcast over heads."""
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, device=positions.device, dtype=torch.float32) / rope_dim)
    angle = positions.float()[:, None] * inv_freq[None, :]  # [T, R/2]
    emb = torch.cat((angle, angle), dim=-1)[:, None, :]  # [T, 1, R]
    return emb.cos(), emb.sin()


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [T, H, R] in place by cos/sin [T, 1, R]: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1).

    Computed in float32 and rounded once to x's dtype. x may be a strided view (a slice of a fused projection).
    """
    half = x.shape[-1] // 2
    x32 = x.float()
    out = x32 * cos  # [T, H, R], a new float32 tensor
    out[..., :half].addcmul_(x32[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x32[..., :half], sin[..., half:])
    x.copy_(out)


class Linear(nn.Module):
    """A linear layer under the checkpoint's names (`weight` [out, in], `bias` [out]); `process_weights` turns the
    weight into its linear backend's form once and drops the checkpoint tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.linear: LinearBackend | None = None
        self.processed: Any = None  # the weight in the backend's form

    @torch.no_grad()
    def process_weights(self, backends: ModelBackends) -> None:
        self.linear, self.processed = backends.linear, backends.linear.process(self.weight)
        del self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.linear is not None, NOT_PROCESSED
        return self.linear.apply(x, self.processed, self.bias)
