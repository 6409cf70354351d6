"""bench/baseline.py computes the real model: its greedy tokens equal the spec reference's."""

from __future__ import annotations

import torch

from bench import baseline
from model import load_checkpoint
from tests.model.conftest import TINY, random_state
from tests.model.reference import reference_greedy


def test_baseline_generate_matches_the_reference() -> None:
    state = random_state(TINY, 1)
    model = load_checkpoint(state, config=TINY)  # the checkpoint's tensors as they are, like a user's own loop
    prompt = [5, 17, 3, 88, 42]
    assert baseline.generate(model, prompt, 8) == reference_greedy(state, TINY, prompt, 8)
    assert model.backends is None  # generate() never processes the weights


def test_baseline_runs_in_bfloat16() -> None:
    model = load_checkpoint(random_state(TINY, 2), dtype=torch.bfloat16, config=TINY)
    assert len(baseline.generate(model, [5, 17, 3], 4)) == 4
    assert model.decoder_layers[0].mlp.moe.routed_experts[0].gate_proj.weight.dtype == torch.bfloat16
