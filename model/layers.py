"""Small building blocks: RMSNorm, rotary embedding, linear layers and experts whose weights a linear
backend may repack.

Shapes: T tokens, D hidden, E experts, I intermediate, R rope dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.ops.linear import PlainLinear
from model.ops.rms_norm import TorchRMSNorm, select_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    _norm: TorchRMSNorm = TorchRMSNorm()  # how it runs (model/ops/rms_norm.py), chosen by prepare()

    def prepare(self, backend: PlainLinear) -> None:
        self._norm = select_rms_norm(self.weight.device, self.weight.dtype)

    def unprepare(self) -> None:
        self._norm = TorchRMSNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 and cast back before the weight, as the training code did.
        return self._norm(x, self.weight, self.eps)


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


def _released(param: nn.Parameter) -> nn.Parameter:
    """A meta-device stand-in: same shape and dtype (parameter counts stay right), no memory."""
    return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)


class PackedLinear(nn.Linear):
    """nn.Linear that runs on a linear backend's prepared copy of its weight once `prepare` is called.

    The dense weight stays (a public attribute others read); the packed copy is derived, never in the state
    dict. NOTE: a prepared layer does not see later in-place writes to its weight; load_state_dict on the
    model re-prepares.
    """

    _prepared: tuple[PlainLinear, torch.Tensor] | None = None  # (backend, prepared weight)

    def prepare(self, backend: PlainLinear) -> None:
        self._prepared = (backend, backend.prepare(self.weight))

    def unprepare(self) -> None:
        self._prepared = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared is None:
            return F.linear(x, self.weight, self.bias)
        backend, weight = self._prepared
        return backend.linear(x, weight, self.bias)


class StackedExperts(nn.Module):
    """E SwiGLU experts whose weights live in two stacked tensors.

    Memory layout: gate_up [E, 2I, D] (gate rows then up rows, fused so one GEMM serves both) and
    down [E, D, I]. Checkpoint layout (state_dict / load_state_dict) keeps the original per-expert names
    `{prefix}{e}.gate_proj.weight`, `{e}.up_proj.weight`, `{e}.down_proj.weight`, so checkpoints load as-is.
    After `prepare(backend)` each expert's two matrices are in the backend's layout. NOTE: a backend whose
    layout is a copy (packed oneDNN, cpp-bf16's panels, int8) releases the stacked tensors (meta stand-ins of
    the same shape, so parameter counts stay right) instead of holding the experts, 87% of the model, twice;
    `state_dict` then unpacks them (exact but for int8) and `unprepare` restores them.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self._backend: PlainLinear | None = None
        self._gate_up: list[torch.Tensor] = []  # per expert, prepared [2I, D]
        self._down: list[torch.Tensor] = []  # per expert, prepared [D, I]

    def prepare(self, backend: PlainLinear) -> None:
        self.unprepare()
        self._gate_up = [backend.prepare(self.gate_up[e]) for e in range(self.num_experts)]
        self._down = [backend.prepare(self.down[e]) for e in range(self.num_experts)]
        self._backend = backend
        if backend.copies_weights:
            self.gate_up, self.down = _released(self.gate_up), _released(self.down)

    def unprepare(self) -> None:
        if self._backend is not None and self.gate_up.is_meta:
            unpack = self._backend.unpack
            self.gate_up = nn.Parameter(torch.stack([unpack(w) for w in self._gate_up]),
                                        requires_grad=self.gate_up.requires_grad)
            self.down = nn.Parameter(torch.stack([unpack(w) for w in self._down]),
                                     requires_grad=self.down.requires_grad)
        self._backend, self._gate_up, self._down = None, [], []

    def prepared_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each expert's gate_up [2I, D] and down [D, I] in the backend's layout (the dense ones unprepared)."""
        if self._backend is None:
            return list(self.gate_up.unbind(0)), list(self.down.unbind(0))
        return self._gate_up, self._down

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) for one expert: x [T, D] -> [T, D]."""
        if self._backend is None:
            gate, up = F.linear(x, self.gate_up[expert]).chunk(2, dim=-1)  # [T, I] each
            return F.linear(F.silu(gate) * up, self.down[expert])
        gate, up = self._backend.linear(x, self._gate_up[expert]).chunk(2, dim=-1)
        return self._backend.linear(F.silu(gate) * up, self._down[expert])

    def checkpoint_views(self) -> dict[str, torch.Tensor]:
        """Original per-expert names -> views into the stacked storage (writing a view writes the weight).

        Once the dense storage is released, these are unpacked copies instead.
        """
        i = self.intermediate_size
        released = self.gate_up.is_meta and self._backend is not None
        views: dict[str, torch.Tensor] = {}
        for e in range(self.num_experts):
            gate_up = self._backend.unpack(self._gate_up[e]) if released else self.gate_up[e]  # type: ignore[union-attr]
            views[f"{e}.gate_proj.weight"] = gate_up[:i]
            views[f"{e}.up_proj.weight"] = gate_up[i:]
            views[f"{e}.down_proj.weight"] = self._backend.unpack(self._down[e]) if released else self.down[e]  # type: ignore[union-attr]
        return views

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name, view in self.checkpoint_views().items():
            destination[prefix + name] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        assert self._backend is None, "unprepare() before loading weights into prepared experts"
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
