"""The fused MoE experts kernel against the torch path (the oracle), and the MoE layer on each backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model import select_backends
from model.moe import MoE
from model.ops import cpu_extension
from model.ops.linear import PlainLinear
from model.ops.moe_base import ExpertWeights
from model.ops.moe_experts import MOE_EXPERTS, CppExperts, TorchExperts
from model.ops.registry import BackendError, Target, select

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")
Weights = tuple[list[torch.Tensor], list[torch.Tensor]]


def _experts(num: int, hidden: int, inter: int, seed: int) -> Weights:
    """Checkpoint-like float32 weights: per expert gate|up [2I, D] and down [D, I]."""
    g = torch.Generator().manual_seed(seed)
    gate_up = [torch.randn(2 * inter, hidden, generator=g) / hidden**0.5 for _ in range(num)]
    down = [torch.randn(hidden, inter, generator=g) / inter**0.5 for _ in range(num)]
    return gate_up, down


def _process(weights: Weights, dtype: torch.dtype, backend: CppExperts | TorchExperts) -> ExpertWeights:
    """`weights` rounded to dtype; the torch oracle gets them back in float32 (the same rounded values)."""
    gate_up, down = ([w.to(dtype) for w in ws] for ws in weights)
    if isinstance(backend, TorchExperts):
        gate_up, down = [w.float() for w in gate_up], [w.float() for w in down]
    return backend.process(gate_up, down, PlainLinear())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 7, 70, 150])  # 70, 150: outer-product GEMMs, 150 > 128-row blocks
# 20/12: scalar tails; 48/40: vectors and a tail at 8 and 16 lanes, one row (two accumulators) included
@pytest.mark.parametrize(("hidden", "inter"), [(32, 24), (20, 12), (48, 40)])
def test_routed_and_shared_match_torch(dtype: torch.dtype, tokens: int, hidden: int, inter: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    oracle, fast = TorchExperts(), CppExperts()
    routed_w, shared_w = _experts(5, hidden, inter, 1), _experts(2, hidden, inter, 2)
    routed, shared = _process(routed_w, dtype, fast), _process(shared_w, dtype, fast)
    routed32, shared32 = _process(routed_w, dtype, oracle), _process(shared_w, dtype, oracle)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(tokens)])  # [T, 2] distinct experts
    weights = torch.rand(tokens, 2, generator=g)
    with torch.no_grad():
        want = oracle.routed(routed32, x.float(), weights, ids, oracle.shared(shared32, x.float()))
        got = fast.routed(routed, x, weights, ids, fast.shared(shared, x))
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want, atol=tol * float(want.abs().max()), rtol=tol)


def test_unused_experts_and_bad_ids() -> None:
    gate_up, down = _experts(4, 16, 8, 3)
    experts = _process((gate_up, down), torch.float32, CppExperts())
    x = torch.randn(3, 16)
    ids = torch.tensor([[1], [1], [1]])  # experts 0, 2 and 3 get nothing
    out = torch.zeros(3, 16)
    torch.ops.customllm.moe_experts(x, ids, torch.ones(3, 1), experts.gate_up, experts.down, out)
    gate, up = F.linear(x, gate_up[1]).chunk(2, dim=-1)
    torch.testing.assert_close(out, F.linear(F.silu(gate) * up, down[1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="expert id 4"):
        torch.ops.customllm.moe_experts(x, ids + 3, torch.ones(3, 1), experts.gate_up, experts.down, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_on_both_backends(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    moe = MoE(32, 24, num_shared_experts=1, num_routed_experts=5, top_k=2).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) / 4)
    oracle = copy.deepcopy(moe)
    moe.process_weights(select_backends("cpu", dtype, moe="cpp"))
    oracle.process_weights(select_backends("cpu", dtype, linear="plain", moe="torch"))
    assert moe.experts is not None and moe.experts.name == "cpp"
    x = torch.randn(9, 32).to(dtype)
    counts = torch.zeros(5, dtype=torch.int64)
    with torch.no_grad():
        got = moe(x, counts)
        want = oracle(x)
    assert int(counts.sum()) == 18
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol * float(want.abs().max()), rtol=tol)


def test_selection() -> None:
    cpu = torch.device("cpu")
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 GEMM then runs the experts
    assert select(MOE_EXPERTS, Target(cpu, torch.bfloat16)).backend.name == ("torch" if native_bf16 else "cpp")
    assert select(MOE_EXPERTS, Target(cpu, torch.float32)).backend.name == "cpp"
    assert select(MOE_EXPERTS, Target(cpu, torch.bfloat16, "int8")).backend.name == "torch"
    assert select(MOE_EXPERTS, Target(cpu, torch.float16)).backend.name == "torch"
    assert select(MOE_EXPERTS, Target(cpu, torch.bfloat16), "torch").backend.name == "torch"
    with pytest.raises(BackendError, match="cannot run on cpu float16: supports bfloat16/float32 only"):
        select(MOE_EXPERTS, Target(cpu, torch.float16), "cpp")
    with pytest.raises(BackendError, match="does not read int8 weights"):
        select(MOE_EXPERTS, Target(cpu, torch.float32, "int8"), "cpp")
