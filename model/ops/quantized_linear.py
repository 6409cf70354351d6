"""Int8 weight-only linear backends (`--quantization int8`): weights stored as int8 with one scale per output
channel, activations and outputs in the model's dtype. Backends of the `INT8_LINEAR` op, with the
interface of `model/ops/linear.py`.

Quantization: scale[o] = max|W[o, :]| / 127, q = round(W / scale) in [-127, 127], so W ~ q * scale[:, None]
(symmetric, no zero point; the error of one weight is at most scale / 2). Matrices with fewer than
`MIN_QUANTIZED_ROWS` outputs (the MoE router, 7 x 768) stay dense: they are a negligible share of the bytes,
and an error there changes which experts a token goes to, not just a logit by a little.

`Int8PackLinear` (CPU) runs torch's `_weight_int8pack_mm`, which reads the int8 weight as is (half the bytes of
bf16: small-batch decode is bound by reading weights). `Int8DequantLinear` (everywhere; the oracle) dequantizes
each weight per call and runs `F.linear`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from model.ops.linear import LinearBackend, linear_case
from model.ops.registry import MakeTensor, Op, Target

MIN_QUANTIZED_ROWS = 16  # matrices with fewer output rows stay dense (see module doc)
# `_weight_int8pack_mm` walks the input dimension in vector-wide steps without a tail loop: on this AVX2 CPU it
# crashed (segfault) or returned garbage for K = 33 and K = 100 and was right for every multiple of 8 tried. A
# matrix whose K is not a multiple of 32 (wide enough for AVX-512 too) takes the dequantizing path instead.
_PACK_K_MULTIPLE = 32
QUANTIZATIONS = ("none", "int8")


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A per-output-channel int8 weight: qweight [out, in] int8, scales [out] in the activation dtype."""

    qweight: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self) -> torch.Tensor:
        """[out, in] in the scales' dtype."""
        return (self.qweight.to(torch.float32) * self.scales.to(torch.float32)[:, None]).to(self.scales.dtype)


def quantize_per_channel(weight: torch.Tensor) -> Int8Weight:
    """weight [out, in] (any float dtype) -> its int8 form, scales in weight's dtype."""
    w = weight.detach().to(torch.float32)
    # A row of zeros gets scale 1 (q = 0), not a division by zero.
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.to(weight.dtype).contiguous())


def _dequant_linear(x: torch.Tensor, weight: Int8Weight | torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(weight, Int8Weight):
        weight = weight.dequantize().to(x.dtype)
    return F.linear(x, weight, bias)


def _process(weight: torch.Tensor) -> Int8Weight | torch.Tensor:
    """The int8 form, or the dense weight for matrices under MIN_QUANTIZED_ROWS outputs (see module doc)."""
    return weight.detach() if weight.shape[0] < MIN_QUANTIZED_ROWS else quantize_per_channel(weight)


class Int8DequantLinear(LinearBackend):
    """Int8 storage, dequantized to the activation dtype on every call: correct everywhere, not fast."""

    name = "int8-dequant"
    quantizations = frozenset({"int8"})

    def process(self, weight: torch.Tensor) -> Int8Weight | torch.Tensor:
        return _process(weight)

    def apply(self, x: torch.Tensor, weight: Int8Weight | torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return _dequant_linear(x, weight, bias)


class Int8PackLinear(LinearBackend):
    """Int8 storage read directly by `torch._weight_int8pack_mm` (x [M, K] float, q [N, K] int8, scales [N])."""

    name = "int8-pack"
    devices = frozenset({"cpu"})
    quantizations = frozenset({"int8"})

    @classmethod
    def requirement(cls, target: Target) -> str | None:
        return None if hasattr(torch, "_weight_int8pack_mm") else "this torch has no _weight_int8pack_mm"

    def process(self, weight: torch.Tensor) -> Int8Weight | torch.Tensor:
        return _process(weight)

    def apply(self, x: torch.Tensor, weight: Int8Weight | torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(weight, Int8Weight) or weight.shape[1] % _PACK_K_MULTIPLE:
            return _dequant_linear(x, weight, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():  # a column slice of a fused projection's output, e.g.
            x2 = x2.contiguous()
        scales = weight.scales if weight.scales.dtype == x.dtype else weight.scales.to(x.dtype)
        out = torch._weight_int8pack_mm(x2, weight.qweight, scales)  # [M, N]
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, out.shape[-1])


def _int8_case(backend: LinearBackend, make: MakeTensor) -> torch.Tensor:
    """K = 64 (the kernel's path, not the dequantizing tail), 80 outputs (ragged), weights at the seed's scale."""
    return linear_case(backend, make, out_features=80, in_features=64, rows=3)


INT8_LINEAR: Op[LinearBackend] = Op(
    "int8 linear", "--linear-backend", (Int8PackLinear, Int8DequantLinear), _int8_case,
    {torch.float32: (0.05, 0.02), torch.bfloat16: (0.05, 0.02), torch.float16: (0.05, 0.02)})
