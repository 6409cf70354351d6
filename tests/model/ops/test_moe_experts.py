"""The fused MoE experts kernel against the torch path (the oracle), and the MoE layer on each backend."""

from __future__ import annotations

import copy

import pytest
import torch

from model.layers import StackedExperts
from model.moe import MoE
from model.ops import cpu_extension
from model.ops.linear import PlainLinear
from model.ops.moe_experts import CppExperts, TorchExperts, kernel_weights_backend, select_experts

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")


def _backend(dtype: torch.dtype) -> PlainLinear:
    backend = kernel_weights_backend(dtype)
    assert backend is not None, dtype
    return backend


def _experts(num: int, hidden: int, inter: int, seed: int) -> StackedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = StackedExperts(num, hidden, inter)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g) / hidden**0.5)
        experts.down.copy_(torch.randn(experts.down.shape, generator=g) / inter**0.5)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 7, 70, 150])  # 70, 150: outer-product GEMMs, 150 > 128-row blocks
# 20/12: scalar tails; 48/40: vectors and a tail at 8 and 16 lanes, one row (two accumulators) included
@pytest.mark.parametrize(("hidden", "inter"), [(32, 24), (20, 12), (48, 40)])
def test_routed_and_shared_match_torch(dtype: torch.dtype, tokens: int, hidden: int, inter: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    routed32, shared32 = _experts(5, hidden, inter, 1), _experts(2, hidden, inter, 2)
    routed, shared = copy.deepcopy(routed32).to(dtype), copy.deepcopy(shared32).to(dtype)
    routed.prepare(_backend(dtype))
    shared.prepare(_backend(dtype))
    routed32.to(dtype).float()  # the oracle runs in float32 on the same rounded weights
    shared32.to(dtype).float()
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(tokens)])  # [T, 2] distinct experts
    weights = torch.rand(tokens, 2, generator=g)
    oracle, fast = TorchExperts(), CppExperts()
    with torch.no_grad():
        want = oracle.routed(routed32, x.float(), weights, ids, oracle.shared(shared32, x.float()))
        got = fast.routed(routed, x, weights, ids, fast.shared(shared, x))
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want, atol=tol * float(want.abs().max()), rtol=tol)


def test_unused_experts_and_bad_ids() -> None:
    experts = _experts(4, 16, 8, 3)
    x = torch.randn(3, 16)
    ids = torch.tensor([[1], [1], [1]])  # experts 0, 2 and 3 get nothing
    out = torch.zeros(3, 16)
    torch.ops.customllm.moe_experts(x, ids, torch.ones(3, 1), *experts.prepared_weights(), out)
    with torch.no_grad():
        want = experts.expert_forward(1, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="expert id 4"):
        torch.ops.customllm.moe_experts(x, ids + 3, torch.ones(3, 1), *experts.prepared_weights(), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_on_both_backends(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    moe = MoE(32, 24, num_shared_experts=1, num_routed_experts=5, top_k=2).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) / 4)
    moe.prepare(_backend(dtype))
    assert moe._experts.name == "cpp"
    x = torch.randn(9, 32).to(dtype)
    counts = torch.zeros(5, dtype=torch.int64)
    with torch.no_grad():
        got = moe(x, counts)
        moe._experts = TorchExperts()
        want = moe(x)
    assert int(counts.sum()) == 18
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol * float(want.abs().max()), rtol=tol)


def test_selection() -> None:
    cpu = torch.device("cpu")
    assert select_experts(cpu, torch.bfloat16, "panels").name == "cpp"
    assert select_experts(cpu, torch.float32, "dense").name == "cpp"
    assert select_experts(cpu, torch.bfloat16, "onednn").name == "torch"  # oneDNN's layout, not the kernel's
    assert select_experts(cpu, torch.bfloat16, "dense").name == "torch"  # the plain backend: the oracle
    assert select_experts(cpu, torch.float16, "dense").name == "torch"
    with pytest.raises(ValueError, match="not usable"):
        select_experts(cpu, torch.float16, "dense", "cpp")
    with pytest.raises(ValueError, match="not usable"):
        select_experts(cpu, torch.float32, "int8", "cpp")
