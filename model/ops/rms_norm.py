"""RMSNorm: backends chosen once at load.

Both compute the reference's `weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)` (MODEL_SPEC): the
normalisation in float32, rounded to x's dtype, then the weight in x's dtype. `TorchRMSNorm` (every device and
dtype; the oracle): F.rms_norm for the float32 part (bitwise equal to the spelled-out formula), then the
weight. `CppRMSNorm` (CPU, bfloat16; model/csrc/rms_norm.cpp): both roundings in one pass per row; its float32 sum
runs in another order than torch's, so about 1 value in 30 000 lands one bfloat16 step away. On AVX2,
torch's bfloat16 F.rms_norm takes 70-200 us for 1 to 64 rows of 768, and a decode step runs 60 of them; the
kernel 27 us at 64 rows. float32 keeps torch's (a float32 sum in another order would not be the reference's
bits).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class TorchRMSNorm:
    name = "torch"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D], weight [D] -> [..., D] in x's dtype."""
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


class CppRMSNorm(TorchRMSNorm):
    name = "cpp"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.ops.customllm.rms_norm(x, weight, eps)


def _self_check(dtype: torch.dtype) -> bool:
    """The kernel against the torch path on rows with a vector tail, to a bfloat16 step (through two roundings)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 37, generator=g) * 3).to(dtype)
    weight = torch.randn(37, generator=g).to(dtype)
    got, want = CppRMSNorm()(x, weight, 1e-5).float(), TorchRMSNorm()(x, weight, 1e-5).float()
    return torch.allclose(got, want, rtol=2**-6, atol=0)


BACKENDS = ("auto", "torch", "cpp")


@functools.cache
def select_rms_norm(device: torch.device, dtype: torch.dtype, name: str = "auto") -> TorchRMSNorm:
    """The RMSNorm backend for weights of this device and dtype ("auto": the C++ kernel for CPU bfloat16)."""
    from model.ops import cpu_extension  # imported here: `python -m model.ops.cpu_extension` imports model first

    assert name in BACKENDS, f"unknown RMSNorm backend {name!r}, expected one of {BACKENDS}"
    usable = cpu_extension.kernel_usable("RMSNorm", name, device, dtype, _self_check,
                                         possible=dtype == torch.bfloat16)
    backend = CppRMSNorm() if usable else TorchRMSNorm()
    logger.info("RMSNorm backend for %s %s: %s", device, dtype, backend.name)
    return backend
