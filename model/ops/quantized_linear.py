"""Int8 weight-only linear backends (`--quantization int8`): weights stored as int8 with one scale per output
channel, activations and outputs in the model's dtype. Chosen once at load, like the float backends in
`model/ops/linear.py`.

Quantization: scale[o] = max|W[o, :]| / 127, q = round(W / scale) in [-127, 127], so W ~ q * scale[:, None]
(symmetric, no zero point; the error of one weight is at most scale / 2). Matrices with fewer than
`MIN_QUANTIZED_ROWS` outputs (the MoE router, 7 x 768) stay dense: they are a negligible share of the bytes,
and an error there changes which experts a token goes to, not just a logit by a little.

`Int8PackLinear` runs torch's `_weight_int8pack_mm` CPU kernel, which reads the int8 weight as is (half the
bytes of bf16: decode at small batches is bound by reading weights). `Int8DequantLinear` dequantizes each
weight per call and runs `F.linear`: the fallback where that op is missing or fails its self-check, and the
oracle the tests hold the kernel to.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from model.ops.linear import PlainLinear

logger = logging.getLogger(__name__)

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


class Int8DequantLinear(PlainLinear):
    """Int8 storage, dequantized to the activation dtype on every call: correct everywhere, not fast."""

    name = "int8-dequant"
    weight_layout = "int8"  # a copy: the dense expert weights are released, the int8 one is what stays in memory

    def prepare(self, weight: torch.Tensor) -> Int8Weight | torch.Tensor:  # type: ignore[override]
        if weight.shape[0] < MIN_QUANTIZED_ROWS:
            return weight.detach()
        return quantize_per_channel(weight)

    def unpack(self, prepared: Int8Weight | torch.Tensor) -> torch.Tensor:
        """The dense weight back: NOTE lossy (the dequantized int8 weight), unlike the float backends."""
        return prepared.dequantize() if isinstance(prepared, Int8Weight) else prepared

    def linear(self, x: torch.Tensor, prepared: Int8Weight | torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(prepared, Int8Weight):
            return F.linear(x, prepared, bias)
        return F.linear(x, prepared.dequantize().to(x.dtype), bias)


class Int8PackLinear(Int8DequantLinear):
    """Int8 storage read directly by `torch._weight_int8pack_mm` (x [M, K] float, q [N, K] int8, scales [N])."""

    name = "int8-pack"

    def linear(self, x: torch.Tensor, prepared: Int8Weight | torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(prepared, Int8Weight) or prepared.shape[1] % _PACK_K_MULTIPLE:
            return super().linear(x, prepared, bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():  # a column slice of a fused projection's output, e.g.
            x2 = x2.contiguous()
        scales = prepared.scales if prepared.scales.dtype == x.dtype else prepared.scales.to(x.dtype)
        out = torch._weight_int8pack_mm(x2, prepared.qweight, scales)  # [M, N]
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, out.shape[-1])


def _int8pack_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    # Self-check against the dequantizing oracle on a small case with a ragged output count, bias included.
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(80, 64, generator=g).to(dtype)
        b = torch.randn(80, generator=g).to(dtype)
        x = torch.randn(3, 64, generator=g).to(dtype)
        fast, slow = Int8PackLinear(), Int8DequantLinear()
        prepared = fast.prepare(w)
        got = fast.linear(x, prepared, b).float()
        want = slow.linear(x.float(), quantize_per_channel(w.float()), b.float())
        ok = torch.allclose(got, want, atol=0.05, rtol=0.02)
    except RuntimeError as exc:
        logger.warning("int8 kernel torch._weight_int8pack_mm unavailable (%s); dequantizing per call", exc)
        return False
    if not ok:
        logger.warning("int8 kernel torch._weight_int8pack_mm failed its self-check; dequantizing per call")
    return ok


def select_quantized_backend(device: torch.device | str, dtype: torch.dtype, quantization: str) -> PlainLinear:
    """The int8 backend for this device and activation dtype: the int8 kernel where it works, else the
    dequantizing fallback. Logs which one runs."""
    if quantization not in ("int8",):
        raise ValueError(f"unknown quantization {quantization!r}, expected one of {QUANTIZATIONS}")
    device = torch.device(device)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"--quantization int8 needs float activations, got {dtype}")
    backend: PlainLinear = Int8PackLinear() if _int8pack_usable(device, dtype) else Int8DequantLinear()
    logger.info("linear backend: %s (int8 weights, per-output-channel scales, %s activations)", backend.name,
                str(dtype).removeprefix("torch."))
    return backend
