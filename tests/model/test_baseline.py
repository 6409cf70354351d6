"""bench/baseline.py computes the real model: its greedy tokens equal the spec reference's."""

from __future__ import annotations

import pytest
import torch

from bench import baseline
from model import CustomLLM, load_model
from model.ops.linear import select_linear_backend
from tests.model.conftest import TINY, randomise
from tests.model.reference import reference_greedy


def test_baseline_generate_matches_the_reference(tiny_model: CustomLLM) -> None:
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.unprepare()
    prompt = [5, 17, 3, 88, 42]
    assert baseline.generate(tiny_model, prompt, 8) == reference_greedy(state, TINY, prompt, 8)


def test_baseline_keeps_the_dense_weights_between_tokens() -> None:
    """A copying backend releases the dense expert weights when the model is prepared; generate() must never
    prepare it, or every token after the first would run on released (meta) experts."""
    if not select_linear_backend("cpu", torch.bfloat16).copies_weights:
        pytest.skip("no copying linear backend on this machine")
    model = load_model(None, dtype=torch.bfloat16, config=TINY)
    randomise(model, 2)
    model.unprepare()
    baseline.generate(model, [5, 17, 3], 4)
    assert model.linear_backend is None
    assert not model.decoder_layers[0].mlp.moe.routed_experts.gate_up.is_meta
