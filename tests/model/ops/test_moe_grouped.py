"""Graph-safe routed experts: the grouped path against the dense oracle, the oracle against a per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from model.ops.moe_base import ExpertWeights, count_experts
from model.ops.moe_experts import MOE_EXPERTS
from model.ops.moe_grouped import DenseMaskedExperts, GroupedExperts
from model.ops.registry import BackendError, Target, select


def case(seed: int, tokens: int, hidden: int = 32, inter: int = 24, num_experts: int = 5, k: int = 2,
         dtype: torch.dtype = torch.float32, skip_expert: int | None = None):
    g = torch.Generator().manual_seed(seed)
    gate_up = 0.2 * torch.randn(num_experts, 2 * inter, hidden, generator=g)
    down = 0.2 * torch.randn(num_experts, hidden, inter, generator=g)
    experts = ExpertWeights(num_experts, gate_up.to(dtype), down.to(dtype))
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    scores = torch.rand(tokens, num_experts, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0  # nobody routes there: an empty group
    weights, ids = scores.topk(k, dim=-1)
    out = torch.randn(tokens, hidden, generator=g).to(dtype)  # what the shared experts left
    return experts, x, weights / weights.sum(-1, keepdim=True), ids, out


def per_token(experts, x, weights, ids, out) -> torch.Tensor:
    """The straightforward definition: out_t + sum_j w_tj * expert_{e_tj}(x_t), in float32."""
    res = out.float().clone()
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist(), strict=True):
            gate, up = F.linear(x[t].float(), experts.gate_up[e].float()).chunk(2)
            res[t] += w * F.linear(F.silu(gate) * up, experts.down[e].float())
    return res


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_dense_oracle_matches_the_definition(tokens: int) -> None:
    args = case(tokens, tokens)
    torch.testing.assert_close(DenseMaskedExperts().routed(*args), per_token(*args), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("tokens,skip", [(1, None), (5, 3), (64, 0), (200, None)])
def test_grouped_matches_dense_in_float32(tokens: int, skip: int | None) -> None:
    args = case(100 + tokens, tokens, skip_expert=skip)
    torch.testing.assert_close(GroupedExperts().routed(*args), DenseMaskedExperts().routed(*args), atol=1e-5,
                               rtol=1e-5)


@torch.no_grad()
def test_grouped_matches_the_definition_in_bfloat16() -> None:
    args = case(7, 48, dtype=torch.bfloat16, skip_expert=2)
    got = GroupedExperts().routed(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), per_token(*args), atol=3e-2, rtol=3e-2)


def test_count_experts_equals_bincount() -> None:
    ids = case(3, 33, skip_expert=4)[3]
    counts = count_experts(ids, 5)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=5).tolist()
    assert counts[4] == 0 and counts.sum() == 66


@torch.no_grad()
@pytest.mark.parametrize("backend", [GroupedExperts(), DenseMaskedExperts()], ids=lambda b: b.name)
def test_no_host_sync_in_the_routed_experts(backend: DenseMaskedExperts) -> None:
    """fullgraph=True fails on any graph break: .item(), .tolist(), bincount, nonzero, boolean-mask indexing."""
    torch._dynamo.reset()
    # bfloat16: torch's shape function for _grouped_mm (what tracing runs) accepts only bf16, as its CUDA kernel.
    args = case(11, 16, dtype=torch.bfloat16, skip_expert=1)
    compiled = torch.compile(backend.routed, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), backend.routed(*args), atol=0, rtol=0)


def test_selection_by_name_and_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert GroupedExperts.unsupported(Target(cpu, torch.float32)) is None  # torch's CPU reference runs it
    assert select(MOE_EXPERTS, Target(cpu, torch.float32)).backend.name not in ("grouped-mm", "dense-masked")
    assert select(MOE_EXPERTS, Target(cpu, torch.float32), "grouped-mm").backend.name == "grouped-mm"
    assert select(MOE_EXPERTS, Target(cpu, torch.float32), "dense-masked").backend.name == "dense-masked"
    assert select(MOE_EXPERTS, Target(cpu, torch.float32), "torch").backend.name == "torch"


def test_int8_weights_keep_the_torch_path_and_forced_names_refuse() -> None:
    int8 = Target(torch.device("cpu"), torch.float32, "int8")
    assert select(MOE_EXPERTS, int8, "torch").backend.name == "torch"
    with pytest.raises(BackendError, match=r"--moe-backend grouped-mm: .* does not read int8 weights"):
        select(MOE_EXPERTS, int8, "grouped-mm")
