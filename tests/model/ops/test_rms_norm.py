"""The bfloat16 RMSNorm kernel against the torch path (the oracle): the same bits but for rare one-step
differences (the float32 sum of squares runs in another order)."""

from __future__ import annotations

import pytest
import torch

from model.ops import cpu_extension
from model.ops.registry import Target, select
from model.ops.rms_norm import RMS_NORM, CppRMSNorm, TorchRMSNorm
from tests.model.test_backend import _tiny


def assert_same_but_rare_steps(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=0)  # a bfloat16 step, through two roundings
    assert (got != want).sum() <= max(1, got.numel() // 1000)

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")


@pytest.mark.parametrize("rows", [0, 1, 3, 64, 130])  # 130 rows: several threads' tasks
@pytest.mark.parametrize("features", [1, 7, 8, 16, 37, 768])  # around 8 and 16 lanes, and vector tails
def test_kernel_gives_the_torch_paths_bits(rows: int, features: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + features)
    x = (torch.randn(rows, features, generator=g) * 4).bfloat16()
    weight = torch.randn(features, generator=g).bfloat16()
    assert_same_but_rare_steps(CppRMSNorm()(x, weight, 1e-5), TorchRMSNorm()(x, weight, 1e-5))


def test_leading_dimensions_tiny_values_and_a_strided_input() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 48, generator=g).bfloat16()
    weight = torch.randn(48, generator=g).bfloat16()
    for inp in (x, x * 1e-3, x.transpose(0, 1)):  # eps matters at tiny values; the transpose is not contiguous
        assert_same_but_rare_steps(CppRMSNorm()(inp, weight, 1e-5), TorchRMSNorm()(inp, weight, 1e-5))


def test_bad_inputs_are_refused_with_a_message() -> None:
    with pytest.raises(RuntimeError, match="bfloat16"):
        CppRMSNorm()(torch.randn(2, 8), torch.randn(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        CppRMSNorm()(torch.randn(2, 8).bfloat16(), torch.randn(4).bfloat16(), 1e-5)


def test_selected_for_bfloat16_only_and_used_by_the_model() -> None:
    cpu = torch.device("cpu")
    assert select(RMS_NORM, Target(cpu, torch.bfloat16)).backend.name == "cpp"
    # float32 keeps torch's own sum order: the reference's bits.
    assert select(RMS_NORM, Target(cpu, torch.float32)).backend.name == "torch"
    layer = _tiny(torch.bfloat16, "cpp-bf16").decoder_layers[0]
    assert layer.input_norm.backend.name == "cpp" and layer.post_attn_norm.backend.name == "cpp"
    assert _tiny(torch.float32, "plain").decoder_layers[0].input_norm.backend.name == "torch"
