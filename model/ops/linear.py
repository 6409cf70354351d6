"""The linear op: how a weight matrix [out, in] is stored (`process`, once after loading) and applied.

`PlainLinear` (every device and dtype; the oracle) is F.linear on the dense weight. `OneDNNPackedLinear` (CPU,
bfloat16 with oneDNN's bf16 GEMM, or float32 by name) reorders each weight once into oneDNN's blocked layout, so
small-batch GEMMs stream it instead of re-laying it out per call. `CppBF16Linear` (CPU bfloat16, the extension's
model/csrc/linear_bf16.cpp) is for CPUs where oneDNN has no bf16 GEMM (AVX2): the weight stays bfloat16 in
panels of 2 vectors of outputs, feature-major (model/csrc/gemm.h), widened in registers, float32 accumulation.
Measurements behind these choices: docs/performance.md.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F

from model.ops.registry import Backend, MakeTensor, Op, Target


class LinearBackend(Backend, abc.ABC):
    """The interface: a processed weight (any object) and x [..., in] -> [..., out] in x's dtype."""

    quantizations = frozenset({"none"})

    @abc.abstractmethod
    def process(self, weight: torch.Tensor) -> Any:
        """The weight [out, in] in this backend's form (may share storage with `weight`)."""

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] with a weight from `process`."""


class PlainLinear(LinearBackend):
    name = "plain"

    def process(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)


_MIN_ROWS = 4  # oneDNN's 1-3 row kernels stream the weight more slowly than its 4-row one


class OneDNNPackedLinear(LinearBackend):
    name = "onednn-packed"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float32})

    @classmethod
    def requirement(cls, target: Target) -> str | None:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_reorder_linear_weight"):
            return "this torch has no oneDNN linear ops"
        if target.dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
            return "oneDNN has no bfloat16 GEMM on this CPU"
        return None

    @classmethod
    def auto_skip(cls, target: Target) -> str | None:
        # NOTE: float32 packing is faster, but oneDNN's narrow float32 kernels grow glibc's heap with every new
        # row count (a test server 0.46 -> 1.9 GB and rising); plain float32 runs on MKL without that.
        return "float32 packs only by name (heap growth)" if target.dtype == torch.float32 else None

    def process(self, weight: torch.Tensor) -> torch.Tensor:
        # An opaque mkldnn tensor. The batch-size hint (1) only picks the layout; it serves every batch size.
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else _MIN_ROWS
        if rows < _MIN_ROWS:  # pad to 4 rows (zeros), drop their outputs
            padded = x.new_zeros(_MIN_ROWS, x.shape[1])
            padded[:rows] = x
            return torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class CppBF16Linear(LinearBackend):
    name = "cpp-bf16"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16})
    needs_extension = True

    def process(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.customllm.pack_panels(weight.detach())  # [out, in] bfloat16, panel order

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.ops.customllm.linear_bf16(x.reshape(-1, x.shape[-1]), weight, bias)  # [rows, out]
        return out.view(*x.shape[:-1], weight.shape[0])


def linear_case(backend: LinearBackend, make: MakeTensor, out_features: int = 37, in_features: int = 40,
                rows: int = 5) -> torch.Tensor:
    """A ragged case (outputs not a multiple of any vector width), bias included: [rows, out]."""
    weight, bias, x = make(out_features, in_features), make(out_features), make(rows, in_features)
    return backend.apply(x, backend.process(weight), bias)


LINEAR: Op[LinearBackend] = Op(
    "linear", "--linear-backend", (OneDNNPackedLinear, CppBF16Linear, PlainLinear), linear_case,
    {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.1, 0.02), torch.float16: (0.05, 0.01)})
