"""Linear backends and prepared (fused, packed) weights: same results as the plain path, exact state dicts."""

import pytest
import torch

from model import CustomLLM, ModelConfig, load_model
from model.ops import cpu_extension
from model.ops.linear import OneDNNPackedLinear, PlainLinear, select_linear_backend
from tests.model.conftest import TINY, randomise
from tests.model.test_model import PagedRunner

PACKED = isinstance(select_linear_backend("cpu", torch.bfloat16), OneDNNPackedLinear)
needs_packed = pytest.mark.skipif(not PACKED, reason="oneDNN packed linear not usable on this CPU")
needs_cpp = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")


def _tiny(dtype: torch.dtype, backend: str, config: ModelConfig = TINY) -> CustomLLM:
    model = load_model(None, dtype=dtype, config=config)
    randomise(model, 3)
    model.prepare_for_inference(backend)
    return model


def _run(model: CustomLLM) -> torch.Tensor:
    """Logits of a few steps mixing prefill chunks and decodes, stacked [steps * seqs, V]."""
    runner = PagedRunner(model)
    out = [runner.step([(0, [5, 6, 7, 8, 9]), (1, [3])])]
    for t in range(4):
        out.append(runner.step([(2, [1, 2, 3][: t + 1]), (0, [t + 10]), (1, [t + 20])]))
    return torch.cat(out)


def test_backend_choice() -> None:
    assert isinstance(select_linear_backend("cpu", torch.float16), PlainLinear)
    assert isinstance(select_linear_backend("cpu", torch.float32), PlainLinear)  # float32 packs only by name
    assert isinstance(select_linear_backend("cpu", torch.float32, "plain"), PlainLinear)
    assert not isinstance(select_linear_backend("meta", torch.bfloat16), OneDNNPackedLinear)
    with pytest.raises(AssertionError, match="unknown linear backend"):
        select_linear_backend("cpu", torch.float32, "fast")


@needs_packed
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_packed_backend_matches_plain(dtype: torch.dtype, tol: float) -> None:
    packed, plain = _tiny(dtype, "onednn-packed"), _tiny(dtype, "plain")
    assert packed.linear_backend is not None and packed.linear_backend.name == "onednn-packed"
    got, want = _run(packed), _run(plain)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0)


@pytest.mark.parametrize(("backend", "dtype"), [pytest.param("onednn-packed", torch.float32, marks=needs_packed),
                                               pytest.param("cpp-bf16", torch.bfloat16, marks=needs_cpp)])
def test_packed_experts_replace_dense_weights_and_state_dict_stays_exact(backend: str, dtype: torch.dtype) -> None:
    model = _tiny(dtype, backend)
    moe = model.decoder_layers[0].mlp.moe
    assert moe.routed_experts.gate_up.is_meta and moe.shared_experts.down.is_meta  # not held twice
    with torch.device("meta"):
        reference_count = sum(p.numel() for p in CustomLLM(TINY).parameters())
    assert sum(p.numel() for p in model.parameters()) == reference_count
    packed_sd = model.state_dict()
    model.unprepare()
    assert not moe.routed_experts.gate_up.is_meta
    dense_sd = model.state_dict()
    assert packed_sd.keys() == dense_sd.keys()
    for name, value in dense_sd.items():
        assert torch.equal(packed_sd[name], value), name


@pytest.mark.parametrize("backend", ["plain", pytest.param("onednn-packed", marks=needs_packed)])
def test_load_state_dict_reprepares(backend: str) -> None:
    model = _tiny(torch.float32, backend)
    fresh = load_model(None, dtype=torch.float32, config=TINY)
    randomise(fresh, 9)
    model.load_state_dict(fresh.state_dict())
    assert model.linear_backend is not None and model.linear_backend.name == backend
    torch.testing.assert_close(_run(model), _run(fresh), atol=1e-5, rtol=1e-5)


def test_unprepared_model_prepares_on_first_forward() -> None:
    model = load_model(None, dtype=torch.float32, config=TINY)
    randomise(model, 4)
    expected = _run(model)
    model.unprepare()
    assert model.linear_backend is None
    torch.testing.assert_close(_run(model), expected, atol=0, rtol=0)
    assert model.linear_backend is not None
