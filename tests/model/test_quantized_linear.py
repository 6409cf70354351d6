"""Int8 weight-only linears: the quantizer's bound, the int8 kernel against the dequantized float32 oracle, and
the backend inside the model (what it quantizes, what it keeps dense, how close its weights stay)."""

from __future__ import annotations

import pytest
import torch

from model import select_backends
from model.ops.quantized_linear import (
    INT8_LINEAR,
    MIN_QUANTIZED_ROWS,
    Int8DequantLinear,
    Int8PackLinear,
    Int8Weight,
    quantize_per_channel,
)
from model.ops.registry import Target, select
from tests.model.conftest import TINY, random_model, random_state

PACK = isinstance(select(INT8_LINEAR, Target(torch.device("cpu"), torch.bfloat16, "int8")).backend, Int8PackLinear)
needs_pack = pytest.mark.skipif(not PACK, reason="torch._weight_int8pack_mm is not usable here")


def test_quantization_error_is_at_most_half_a_step_per_weight() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * torch.rand(96, 1, generator=g)  # rows of different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    q = quantize_per_channel(w)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (96, 64) and q.scales.shape == (96,)
    assert int(q.qweight.abs().max()) == 127  # each row's largest weight uses the full range
    assert torch.equal(q.qweight[5], torch.zeros(64, dtype=torch.int8))
    err = (q.dequantize() - w).abs()
    assert bool((err <= q.scales[:, None] / 2 + 1e-7).all())


def _oracle(x: torch.Tensor, q: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """float32: x @ (q * scale).T + bias."""
    w32 = Int8Weight(q.qweight, q.scales.float())
    return Int8DequantLinear().apply(x.float(), w32, None if bias is None else bias.float())


@needs_pack
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (81, 768), (3072, 768), (768, 1536), (64, 40)])
def test_int8_kernel_matches_the_dequantized_oracle(dtype: torch.dtype, rows: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    backend = Int8PackLinear()
    prepared = backend.process(w)
    assert isinstance(prepared, Int8Weight)
    got = backend.apply(x, prepared, b)
    assert got.dtype == dtype and got.shape == (rows, n)
    want = _oracle(x, prepared, b)
    # float32 accumulates either way; bf16 rounds the output (8 bits) and, in the kernel, the scales.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= tol * scale


@needs_pack
def test_int8_kernel_takes_batched_and_sliced_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    backend = Int8PackLinear()
    prepared = backend.process(torch.randn(128, 64, generator=g).bfloat16())
    wide = torch.randn(2, 5, 96, generator=g).bfloat16()
    x = wide[..., 16:80]  # [2, 5, 64], not contiguous
    got = backend.apply(x, prepared)
    assert got.shape == (2, 5, 128)
    assert torch.allclose(got.float(), _oracle(x.reshape(10, 64), prepared, None).view(2, 5, 128), rtol=0.02,
                          atol=0.05)


def test_small_matrices_stay_dense() -> None:
    w = torch.randn(MIN_QUANTIZED_ROWS - 1, 64)
    for backend in (Int8DequantLinear(), Int8PackLinear()):
        prepared = backend.process(w)
        assert isinstance(prepared, torch.Tensor) and torch.equal(prepared, w)
        assert torch.equal(backend.apply(torch.ones(2, 64), prepared), torch.ones(2, 64) @ w.T)


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        select_backends("cpu", torch.float32, "int4")


def test_model_on_int8_quantizes_experts_and_lm_head_and_keeps_the_router() -> None:
    dense = random_state(TINY, 3)
    model = random_model(TINY, 3, quantization="int8")
    moe = model.decoder_layers[0].mlp.moe
    assert moe.routed is not None and moe.shared is not None
    assert all(isinstance(w, Int8Weight) for w in moe.routed.gate_up + moe.routed.down)
    assert isinstance(model.lm_head.processed, Int8Weight)
    assert not isinstance(moe.router_weight, Int8Weight)
    # The dequantized expert weights stay within half a quantization step of the checkpoint's.
    prefix = "decoder_layers.0.mlp.moe.routed_experts"
    for e in range(moe.routed.num_experts):
        for got, name in ((moe.routed.gate_up[e], "gate_up"), (moe.routed.down[e], "down_proj")):
            want = (torch.cat((dense[f"{prefix}.{e}.gate_proj.weight"], dense[f"{prefix}.{e}.up_proj.weight"]))
                    if name == "gate_up" else dense[f"{prefix}.{e}.down_proj.weight"])
            per_row = want.abs().amax(dim=-1, keepdim=True) / 127
            assert bool(((got.dequantize() - want).abs() <= per_row / 2 + 1e-6).all()), (e, name)
