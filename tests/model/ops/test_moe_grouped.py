"""Graph-safe routed experts: the grouped path against the dense oracle, the oracle against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from model.ops.moe_grouped import DenseMaskedMoE, GroupedMoE, count_experts, select_graph_safe_moe


def case(seed: int, tokens: int, hidden: int = 32, inter: int = 24, num_experts: int = 5, k: int = 2,
         dtype: torch.dtype = torch.float32, skip_expert: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    gate_up = (0.2 * torch.randn(num_experts, 2 * inter, hidden, generator=g)).to(dtype)
    down = (0.2 * torch.randn(num_experts, hidden, inter, generator=g)).to(dtype)
    scores = torch.rand(tokens, num_experts, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0  # nobody routes there: an empty group
    weights, experts = scores.topk(k, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), experts, gate_up, down


def per_token(x, weights, experts, gate_up, down) -> torch.Tensor:
    """The straightforward definition: out_t = sum_j w_tj * expert_{e_tj}(x_t)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), experts[t].tolist(), strict=True):
            gate, up = F.linear(x[t].float(), gate_up[e].float()).chunk(2)
            out[t] += w * F.linear(F.silu(gate) * up, down[e].float())
    return out


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_dense_oracle_matches_the_definition(tokens: int) -> None:
    args = case(tokens, tokens)
    torch.testing.assert_close(DenseMaskedMoE().routed(*args), per_token(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,skip", [(1, None), (5, 3), (64, 0), (200, None)])
def test_grouped_matches_dense_in_float32(tokens: int, skip: int | None) -> None:
    args = case(100 + tokens, tokens, skip_expert=skip)
    torch.testing.assert_close(GroupedMoE().routed(*args), DenseMaskedMoE().routed(*args), atol=1e-5, rtol=1e-5)


def test_grouped_matches_dense_in_bfloat16() -> None:
    args = case(7, 48, dtype=torch.bfloat16, skip_expert=2)
    got = GroupedMoE().routed(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), per_token(*args), atol=3e-2, rtol=3e-2)


def test_count_experts_equals_bincount() -> None:
    _, _, experts, _, _ = case(3, 33, skip_expert=4)
    counts = count_experts(experts, 5)
    assert counts.tolist() == torch.bincount(experts.flatten(), minlength=5).tolist()
    assert counts[4] == 0 and counts.sum() == 66


@pytest.mark.parametrize("backend", [GroupedMoE(), DenseMaskedMoE()], ids=lambda b: b.name)
def test_no_host_sync_in_the_routed_experts(backend: DenseMaskedMoE) -> None:
    """fullgraph=True fails on any graph break: .item(), .tolist(), bincount, nonzero, boolean-mask indexing."""
    torch._dynamo.reset()
    # bfloat16: torch's shape function for _grouped_mm (what tracing runs) accepts only bf16, as its CUDA kernel.
    args = case(11, 16, dtype=torch.bfloat16, skip_expert=1)
    compiled = torch.compile(backend.routed, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), backend.routed(*args), atol=0, rtol=0)


def test_cpu_selects_grouped_mm_and_names_can_force_the_oracle() -> None:
    assert select_graph_safe_moe(torch.device("cpu"), torch.float32).name == "grouped-mm"
    assert select_graph_safe_moe(torch.device("cpu"), torch.float32, "dense-masked").name == "dense-masked"
