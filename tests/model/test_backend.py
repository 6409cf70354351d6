"""Backend choice for the linear op and weights processed once: same results as the plain path."""

import pytest
import torch

from model import CustomLLM, ModelConfig, load_checkpoint, select_backends
from model.ops import cpu_extension
from model.ops.linear import LINEAR, OneDNNPackedLinear
from model.ops.registry import BackendError, Target, select
from tests.model.conftest import TINY, random_model, random_state
from tests.model.test_model import PagedRunner

CPU = torch.device("cpu")
PACKED = select(LINEAR, Target(CPU, torch.bfloat16)).backend.name == "onednn-packed"
needs_packed = pytest.mark.skipif(not PACKED, reason="oneDNN packed linear not usable on this CPU")
needs_cpp = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")


def _tiny(dtype: torch.dtype, backend: str, config: ModelConfig = TINY, **others: str) -> CustomLLM:
    return random_model(config, 3, dtype, linear=backend, **others)


def _run(model: CustomLLM) -> torch.Tensor:
    """Logits of a few steps mixing prefill chunks and decodes, stacked [steps * seqs, V]."""
    runner = PagedRunner(model)
    out = [runner.step([(0, [5, 6, 7, 8, 9]), (1, [3])])]
    for t in range(4):
        out.append(runner.step([(2, [1, 2, 3][: t + 1]), (0, [t + 10]), (1, [t + 20])]))
    return torch.cat(out)


def test_backend_choice() -> None:
    assert select(LINEAR, Target(CPU, torch.float16)).backend.name == "plain"
    assert select(LINEAR, Target(CPU, torch.float32)).backend.name == "plain"  # float32 packs only by name
    assert select(LINEAR, Target(CPU, torch.float32), "plain").backend.name == "plain"
    assert OneDNNPackedLinear.unsupported(Target(torch.device("cuda"), torch.bfloat16)) is not None
    with pytest.raises(BackendError, match="unknown linear backend 'fast'"):
        select(LINEAR, Target(CPU, torch.float32), "fast")


@needs_packed
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_packed_backend_matches_plain(dtype: torch.dtype, tol: float) -> None:
    packed, plain = _tiny(dtype, "onednn-packed"), _tiny(dtype, "plain")
    assert packed.backends is not None and packed.backends.linear.name == "onednn-packed"
    got, want = _run(packed), _run(plain)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0)


@pytest.mark.parametrize(("backend", "dtype"), [pytest.param("onednn-packed", torch.float32, marks=needs_packed),
                                               pytest.param("cpp-bf16", torch.bfloat16, marks=needs_cpp),
                                               ("plain", torch.float32)])
def test_processing_keeps_only_what_the_backends_run_on(backend: str, dtype: torch.dtype) -> None:
    model = _tiny(dtype, backend)
    # The converted checkpoint tensors are gone (the experts are not held twice); what runs as loaded stays.
    kept = {name.split(".")[-2] + "." + name.split(".")[-1] for name in model.state_dict()}
    assert kept == {"token_embeddings.weight", "position_embeddings.weight", "input_norm.weight",
                    "post_attn_norm.weight", "moe.routing_bias", "lm_head.bias"}
    with torch.device("meta"):
        assert model.num_parameters == sum(p.numel() for p in CustomLLM(TINY).parameters())


def test_weights_are_processed_once_and_required() -> None:
    model = _tiny(torch.float32, "plain")
    with pytest.raises(AssertionError, match="processed once"):
        model.process_weights(select_backends("cpu", torch.float32))
    plain = load_checkpoint(random_state(TINY, 3), config=TINY)
    with pytest.raises(AssertionError, match="process_weights"):
        _run(plain)
    plain.process_weights(select_backends("cpu", torch.float32, linear="plain"))
    torch.testing.assert_close(_run(plain), _run(model), atol=0, rtol=0)
