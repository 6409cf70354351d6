"""Linear backends: how a weight matrix is stored and applied on this device and dtype, chosen once at load.

`PlainLinear` is torch's `F.linear` on the dense weight: every device and dtype, and the oracle the others
are checked against. `OneDNNPackedLinear` (CPU, bfloat16/float32) reorders each weight once into oneDNN's
blocked layout, so small-batch GEMMs stream the weight instead of re-laying it out on every call
(measured on the seed model: lm_head at 64 rows 32 ms -> 13 ms in bf16, 72 ms -> 27 ms in fp32).
`CppBF16Linear` (CPU, bfloat16, model/csrc/linear_bf16.cpp) is for CPUs where oneDNN has no bfloat16 GEMM
(AVX2 only, e.g. AMD Zen 3): there torch's bfloat16 F.linear takes a reference path, 20-100x slower than
float32 MKL (3072x768 at 8 rows: 9.9 ms against 1.2 ms float32 and 0.44 ms for this kernel, best of 40 on
a loaded 2-core Zen 3); the kernel keeps the weight in bfloat16, reordered once into panels of 2 vectors of
output features stored feature-major, which each thread streams sequentially (model/csrc/gemm.h), and widens
it in registers.

Each backend names its `weight_layout`, which tells the MoE experts' backends whether they can run on the
prepared expert weights (model/ops/moe_experts.py).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class PlainLinear:
    """Dense weights and `F.linear`; prepared weights share storage with the parameters."""

    name = "plain"
    weight_layout = "dense"  # what prepare() returns: "dense", "onednn", "panels" (bfloat16) or "int8"

    @property
    def copies_weights(self) -> bool:
        """Whether prepare() returns a copy (any layout but the dense weight itself, or a view of it)."""
        return self.weight_layout != "dense"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight [out, in] in this backend's layout."""
        return weight.detach()

    def unpack(self, prepared: torch.Tensor) -> torch.Tensor:
        """The dense weight [out, in] back from a prepared one (exact)."""
        return prepared

    def linear(self, x: torch.Tensor, prepared: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return F.linear(x, prepared, bias)


_MIN_ROWS = 4  # see OneDNNPackedLinear.linear


class OneDNNPackedLinear(PlainLinear):
    """Weights reordered once into oneDNN's blocked layout (an opaque mkldnn tensor, a copy)."""

    name = "onednn-packed"
    weight_layout = "onednn"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        # The batch-size hint only picks the layout; 1 (decode) served every batch size as well as a
        # hint equal to the batch in the bf16 measurements.
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def unpack(self, prepared: torch.Tensor) -> torch.Tensor:
        return prepared.to_dense()

    def linear(self, x: torch.Tensor, prepared: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else _MIN_ROWS
        if rows < _MIN_ROWS:
            # oneDNN's kernels for 1-3 rows stream the weight more slowly than its 4-row kernel (bf16, this
            # CPU: 3072x768 0.179/0.213/0.178 ms for 1/2/3 rows, 0.168 ms for 4; lm_head 2.59 vs 2.30 ms),
            # so a short input is padded with zero rows whose outputs are dropped.
            padded = x.new_zeros(_MIN_ROWS, x.shape[1])
            padded[:rows] = x
            return torch.ops.mkldnn._linear_pointwise(padded, prepared, bias, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, prepared, bias, "none", [], "")


class CppBF16Linear(PlainLinear):
    """bfloat16 weights in the extension's panel layout (a copy), applied by its float32-accumulating kernel."""

    name = "cpp-bf16"
    weight_layout = "panels"

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.customllm.pack_panels(weight.detach())

    def unpack(self, prepared: torch.Tensor) -> torch.Tensor:
        return torch.ops.customllm.unpack_panels(prepared)

    def linear(self, x: torch.Tensor, prepared: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.ops.customllm.linear_bf16(x.reshape(-1, x.shape[-1]), prepared, bias)  # [rows, out]
        return out.view(*x.shape[:-1], prepared.shape[0])


class Preparable(Protocol):
    """A module that builds derived weights for a backend (`prepare`) and drops them again (`unprepare`)."""

    def prepare(self, backend: PlainLinear) -> None: ...

    def unprepare(self) -> None: ...


def _onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
        return False
    # Self-check on a small case, bias included: a build whose ops misbehave falls back to plain.
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        x = torch.randn(3, 40, generator=g).to(dtype)
        backend = OneDNNPackedLinear()
        packed = backend.prepare(w)
        got = backend.linear(x, packed, b).float()
        ok = torch.allclose(got, F.linear(x, w, b).float(), atol=0.1, rtol=0.02) and torch.equal(
            backend.unpack(packed), w)
    except RuntimeError as exc:
        logger.warning("oneDNN packed linear unavailable (%s); using plain torch linear", exc)
        return False
    if not ok:
        logger.warning("oneDNN packed linear failed its self-check; using plain torch linear")
    return ok


def _cpp_bf16_usable(device: torch.device, dtype: torch.dtype) -> bool:
    from model.ops import cpu_extension  # imported here: `python -m model.ops.cpu_extension` imports model first

    if device.type != "cpu" or dtype != torch.bfloat16 or not cpu_extension.load():
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 40, generator=g).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    x = torch.randn(5, 40, generator=g).to(dtype)
    backend = CppBF16Linear()
    packed = backend.prepare(w)
    got = backend.linear(x, packed, b).float()
    ok = torch.allclose(got, F.linear(x.float(), w.float(), b.float()), atol=0.05, rtol=0.01) and torch.equal(
        backend.unpack(packed), w)
    if not ok:
        logger.warning("bfloat16 linear kernel failed its self-check; using plain torch linear")
    return ok


BACKENDS = ("auto", "plain", "onednn-packed", "cpp-bf16")


def select_linear_backend(device: torch.device | str, dtype: torch.dtype, name: str = "auto") -> PlainLinear:
    """The backend for weights of this device and dtype: "auto" is packed oneDNN for bfloat16 on CPUs with
    bfloat16 GEMM, the extension's kernel for bfloat16 on other CPUs, plain elsewhere.

    NOTE: packing also speeds float32 up (seed model: b1 161 -> 128 ms, b8 510 -> 280 ms, b64 840 -> 654 ms),
    but oneDNN's float32 kernels for narrow layers grow glibc's heap with every new row count (a 64-wide test
    model's server went from 0.46 to 1.9 GB resident and kept growing), while plain float32 runs on MKL
    without that; so float32 stays plain unless asked for by name.
    """
    assert name in BACKENDS, f"unknown linear backend {name!r}, expected one of {BACKENDS}"
    device = torch.device(device)
    backend = _select(device, dtype, name)
    logger.info("linear backend for %s %s: %s", device, dtype, backend.name)
    return backend


def _select(device: torch.device, dtype: torch.dtype, name: str) -> PlainLinear:
    if name == "plain" or (name == "auto" and dtype != torch.bfloat16):
        return PlainLinear()
    if name == "cpp-bf16":
        if not _cpp_bf16_usable(device, dtype):
            raise ValueError(f"linear backend cpp-bf16 is not usable on {device} with {dtype}")
        return CppBF16Linear()
    usable = _onednn_usable(device, dtype)
    if name == "onednn-packed" and not usable:
        raise ValueError(f"linear backend onednn-packed is not usable on {device} with {dtype}")
    if usable:
        return OneDNNPackedLinear()
    return CppBF16Linear() if name == "auto" and _cpp_bf16_usable(device, dtype) else PlainLinear()
