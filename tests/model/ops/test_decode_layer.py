"""The fused decode layer (one extension call per layer) against the layers' modules, and its selection."""

from __future__ import annotations

import random

import pytest
import torch

from model import AttentionMetadata, CustomLLM, load_model, select_backends
from model.ops import cpu_extension
from model.ops.decode_layer import CppDecodeLayer, ModuleDecodeLayer
from model.ops.registry import BackendError
from tests.model.conftest import TINY, random_state
from tests.model.reference import reference_logits
from tests.model.test_model import PagedRunner

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")


def _model(dtype: torch.dtype, fused: bool, **names: str) -> CustomLLM:
    backends = select_backends("cpu", dtype, decode_layer="auto" if fused else "modules", **names)
    return load_model(random_state(TINY, 1), dtype=dtype, config=TINY, backends=backends)


def _decode(model: CustomLLM, steps: int, follow: dict[int, list[int]] | None = None
            ) -> tuple[list[torch.Tensor], dict[int, list[int]], torch.Tensor]:
    """Prefill 3 prompts (3, 6 and 9 tokens: blocks of 4, partial and whole), then all-decode steps of greedy
    tokens, or of `follow`'s tokens (another run's) when given. Returns each decode step's logits [3, V], the
    tokens and the expert counts [layers, E] of the decodes."""
    runner = PagedRunner(model)
    gen = random.Random(0)
    tokens = {s: [gen.randrange(TINY.vocab_size) for _ in range(n)] for s, n in enumerate([3, 6, 9])}

    def pick(s: int, row: torch.Tensor) -> None:
        tokens[s].append(int(row.argmax()) if follow is None else follow[s][len(tokens[s])])

    logits = runner.step([(s, t) for s, t in tokens.items()])
    for s, row in enumerate(logits):
        pick(s, row)
    counts = torch.zeros(TINY.num_hidden_layers, TINY.num_routed_experts, dtype=torch.int64)
    outs = []
    for _ in range(steps):
        # PagedRunner.step with expert counts: every sequence one new token
        seqs = sorted(tokens)
        for s in seqs:
            runner.computed[s] += 1
            table = runner.tables[s]
            while len(table) * 4 < runner.computed[s]:
                table.append(runner.free.pop())
        meta = AttentionMetadata.build([1] * len(seqs), [runner.computed[s] for s in seqs],
                                       [runner.tables[s] for s in seqs], 4)
        ids = torch.tensor([tokens[s][-1] for s in seqs])
        positions = torch.tensor([runner.computed[s] - 1 for s in seqs])
        hidden = model(ids, positions, meta, runner.cache.layers, counts)
        step_logits = model.compute_logits(hidden)
        outs.append(step_logits)
        for s, row in zip(seqs, step_logits, strict=True):
            pick(s, row)
    return outs, tokens, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_matches_the_module_path(dtype: torch.dtype) -> None:
    fused, modules = _model(dtype, fused=True), _model(dtype, fused=False)
    assert all(layer.fused_decode is not None for layer in fused.decoder_layers)
    assert all(layer.fused_decode is None for layer in modules.decoder_layers)
    got, got_tokens, got_counts = _decode(fused, 8)
    want, _, want_counts = _decode(modules, 8, follow=got_tokens)  # the same inputs at every step
    # The same ops in the same order, except the absorption products' float32 sums (decode_layer.cpp).
    tol = 1e-5 if dtype == torch.float32 else 0.05
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=tol * float(b.abs().max()), rtol=tol, msg=f"step {step}")
    if dtype == torch.float32:
        assert all(int(a.argmax()) == int(b.argmax()) for x, y in zip(got, want, strict=True)
                   for a, b in zip(x, y, strict=True))
        assert torch.equal(got_counts, want_counts)
    assert int(got_counts.sum()) == int(want_counts.sum()) == 8 * 3 * 2 * TINY.num_hidden_layers


def test_fused_decode_float32_tokens_are_the_reference() -> None:
    fused = _model(torch.float32, fused=True)
    state = random_state(TINY, 1)
    steps, tokens, _ = _decode(fused, 8)
    for s, seq in tokens.items():
        prompt_len = len(seq) - 9
        for i, step_logits in enumerate(steps):
            ref = reference_logits(state, TINY, seq[:prompt_len + 1 + i])[-1]
            torch.testing.assert_close(step_logits[s], ref, atol=1e-4, rtol=1e-4)
            assert int(step_logits[s].argmax()) == int(ref.argmax()) == seq[prompt_len + 1 + i]


def test_selection_follows_the_other_backends() -> None:
    chosen = select_backends("cpu", torch.bfloat16)
    assert isinstance(chosen.decode_layer, CppDecodeLayer)
    assert "decode layer" in chosen.table() and "cpp" in chosen.table().splitlines()[-1]
    torch_experts = select_backends("cpu", torch.bfloat16, moe="torch")
    assert isinstance(torch_experts.decode_layer, ModuleDecodeLayer)
    assert "runs the cpp MoE experts, not torch" in torch_experts.table().splitlines()[-1]
    model = _model(torch.float32, fused=True, attention="torch")
    assert all(layer.fused_decode is None for layer in model.decoder_layers)
    with pytest.raises(BackendError, match="cannot run here: runs the cpp MoE experts, not torch"):
        select_backends("cpu", torch.bfloat16, moe="torch", decode_layer="cpp")
