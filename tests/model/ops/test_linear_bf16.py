"""The bfloat16-weight linear kernel against torch's F.linear (the oracle)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.ops import cpu_extension
from model.ops.linear import LINEAR, CppBF16Linear
from model.ops.registry import BackendError, Target, select
from tests.model.conftest import TINY
from tests.model.test_backend import _run, _tiny

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")


# Register tiles of up to 6 rows (1-5: a short last tile), passes of 120 rows over the weight (121, 130).
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 12, 13, 18, 31, 64, 121, 130])
# Panels of 2 vectors of outputs, 16 at 8 lanes and 32 at 16: whole ones (64), whole ones and a narrow last one
# (48 at 16 lanes, 37, 17), only a narrow one (5, 13); any number of input features (no feature tails).
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 8), (48, 64), (37, 40), (17, 3), (5, 19), (13, 1100)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_matches_float32_linear(rows: int, out_features: int, in_features: int, x_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16()
    x = torch.randn(rows, in_features, generator=g).to(x_dtype)
    backend = CppBF16Linear()
    packed = backend.process(w)
    for bias in (None, b):
        got = backend.apply(x, packed, bias)
        assert got.dtype == x_dtype and got.shape == (rows, out_features)
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        # float32 accumulation, rounded once to the output dtype
        tol = 1e-2 if x_dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.float(), want, atol=tol * float(want.abs().max()), rtol=0)


def test_leading_dimensions_and_empty_input() -> None:
    w = torch.randn(24, 16).bfloat16()
    x = torch.randn(2, 3, 16).bfloat16()
    backend = CppBF16Linear()
    packed = backend.process(w)
    got = backend.apply(x, packed)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, F.linear(x.float(), w.float()).bfloat16(), atol=0.05, rtol=0.01)
    assert backend.apply(x[:0, 0], packed).shape == (0, 24)
    # A column slice of a wider tensor (attention's fused projection feeds one): strided rows, read in place.
    cols = torch.randn(5, 40).bfloat16()[:, 7:23]
    torch.testing.assert_close(backend.apply(cols, packed), F.linear(cols.float(), w.float()).bfloat16(),
                               atol=0.05, rtol=0.01)


def test_nan_stays_nan() -> None:
    backend = CppBF16Linear()
    x = torch.ones(2, 16).bfloat16()
    x[0, 3] = float("nan")
    out = backend.apply(x, backend.process(torch.ones(20, 16).bfloat16()))
    assert out[0].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize("out_features", [1, 5, 15, 16, 17, 32, 33, 40])  # around panels of 16 and 32 outputs
@pytest.mark.parametrize("in_features", [1, 7, 16, 33])
def test_panels_are_a_permutation_that_unpacks_exactly(out_features: int, in_features: int) -> None:
    w = torch.arange(out_features * in_features, dtype=torch.float32).view(out_features, in_features).bfloat16()
    backend = CppBF16Linear()
    packed = backend.process(w)
    assert packed.shape == w.shape and packed.dtype == torch.bfloat16
    assert torch.equal(packed.flatten().sort().values, w.flatten().sort().values)  # every element once
    assert torch.equal(torch.ops.customllm.unpack_panels(packed), w)
    # Feature-major inside a panel: the first panel's first values are output 0..n of feature 0.
    lanes = cpu_extension.vector_lanes()
    assert lanes is not None
    first = min(out_features, 2 * lanes)
    assert torch.equal(packed.flatten()[:first], w[:first, 0])


def test_selected_where_onednn_has_no_bf16() -> None:
    cpu = torch.device("cpu")
    name = select(LINEAR, Target(cpu, torch.bfloat16)).backend.name
    expected = "onednn-packed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "cpp-bf16"
    assert name == expected
    assert select(LINEAR, Target(cpu, torch.float32)).backend.name == "plain"
    with pytest.raises(BackendError, match="linear backend cpp-bf16 cannot run on cpu float32: supports bfloat16"):
        select(LINEAR, Target(cpu, torch.float32), "cpp-bf16")


# Top-k = all routed experts: no near-tie in the routing that bfloat16 rounding could flip.
EVERY_EXPERT_ROUTED = dataclasses.replace(TINY, top_k_experts=TINY.num_experts - TINY.num_shared_experts)


def test_model_matches_plain_backend() -> None:
    fast = _tiny(torch.bfloat16, "cpp-bf16", EVERY_EXPERT_ROUTED, moe="cpp")
    plain = _tiny(torch.bfloat16, "plain", EVERY_EXPERT_ROUTED, moe="torch")  # the oracles of linear and MoE
    assert fast.backends is not None and fast.backends.linear.name == "cpp-bf16"
    got, want = _run(fast), _run(plain)
    # bfloat16 end to end: the plain path rounds every GEMM's partial sums differently
    torch.testing.assert_close(got, want, atol=0.03 * float(want.abs().max()), rtol=0)
