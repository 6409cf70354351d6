"""Small building blocks: RMSNorm, rotary embedding, and experts stored stacked.

Shapes: T tokens, D hidden, E experts, I intermediate, R rope dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the training code did.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, R] (float32) for the half-split rotary convention."""
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, device=positions.device, dtype=torch.float32) / rope_dim)
    angle = positions.float()[:, None] * inv_freq[None, :]  # [T, R/2]
    emb = torch.cat((angle, angle), dim=-1)  # [T, R]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, R] by cos/sin [T, R]: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


class StackedExperts(nn.Module):
    """E SwiGLU experts whose weights live in two stacked tensors.

    Memory layout: gate_up [E, 2I, D] (gate rows then up rows, fused so one GEMM serves both) and
    down [E, D, I]. Checkpoint layout (state_dict / load_state_dict) keeps the original per-expert names
    `{prefix}{e}.gate_proj.weight`, `{e}.up_proj.weight`, `{e}.down_proj.weight`, so checkpoints load as-is.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) for one expert: x [T, D] -> [T, D]."""
        gate, up = F.linear(x, self.gate_up[expert]).chunk(2, dim=-1)  # [T, I] each
        return F.linear(F.silu(gate) * up, self.down[expert])

    def checkpoint_views(self) -> dict[str, torch.Tensor]:
        """Original per-expert names -> views into the stacked storage (writing a view writes the weight)."""
        i = self.intermediate_size
        views: dict[str, torch.Tensor] = {}
        for e in range(self.num_experts):
            views[f"{e}.gate_proj.weight"] = self.gate_up[e, :i]
            views[f"{e}.up_proj.weight"] = self.gate_up[e, i:]
            views[f"{e}.down_proj.weight"] = self.down[e]
        return views

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, view in self.checkpoint_views().items():
            destination[prefix + name] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        views = self.checkpoint_views()
        for name, view in views.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != view.shape:
                error_msgs.append(f"size mismatch for {key}: expected {tuple(view.shape)}, "
                                  f"found {tuple(value.shape)}")
                continue
            with torch.no_grad():
                view.copy_(value)
        if strict:
            own = {prefix + name for name in views}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in own)
