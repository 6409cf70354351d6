"""The RMSNorm op: `weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)` (MODEL_SPEC), the normalisation in
float32 rounded to x's dtype, then the weight in x's dtype.

`TorchRMSNorm` (every device and dtype; the oracle): F.rms_norm for the float32 part (bitwise the spelled-out
formula), then the weight. `CppRMSNorm` (CPU bfloat16; model/csrc/rms_norm.cpp): both roundings in one pass per
row; its float32 sum runs in another order, so about 1 value in 30 000 lands one bfloat16 step away. float32
keeps torch's (another sum order would not give the reference's bits).
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from model.ops.registry import Backend, MakeTensor, Op


class RMSNormBackend(Backend, abc.ABC):
    """The interface: x [..., D], weight [D] -> [..., D] in x's dtype."""

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...


class TorchRMSNorm(RMSNormBackend):
    name = "torch"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class CppRMSNorm(RMSNormBackend):
    name = "cpp"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16})
    needs_extension = True

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.ops.customllm.rms_norm(x, weight, eps)


def _case(backend: RMSNormBackend, make: MakeTensor) -> torch.Tensor:
    """Rows of 37 (a vector tail at 8 and 16 lanes): [3, 37]."""
    return backend(make(3, 37, scale=3.0), make(37), 1e-5)


RMS_NORM: Op[RMSNormBackend] = Op(
    "RMSNorm", None, (CppRMSNorm, TorchRMSNorm), _case,
    {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2**-6), torch.float16: (1e-3, 2**-9)})
