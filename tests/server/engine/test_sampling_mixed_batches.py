"""Issue 26.13: sampling settings are per row. For every subset of the sampling features, a row sampled beside rows
with other settings gets the filtered distribution and the seeded draw it gets alone."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from server.engine.logits_processors import apply_penalties, apply_temperature_and_filters
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams

EOS = 3
VOCAB = 600  # wider than the first top_p candidate step (256): the CPU shortcuts run

FEATURES: dict[str, dict[str, object]] = {
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 6},
    "top_p": {"top_p": 0.8},
    "min_p": {"min_p": 0.05},
    "penalties": {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3},
    "logit_bias": {"logit_bias": {5: 4.0, 11: -5.0}},
    "seed": {"seed": 4242},
}
SUBSETS = [frozenset(c) for n in range(len(FEATURES) + 1) for c in itertools.combinations(FEATURES, n)]
# Batch neighbours: one per shortcut of the filters (all rows top_k, all rows top_p, mixed), and the other paths.
NEIGHBOURS: list[dict[str, object]] = [
    {"top_p": 0.95}, {"top_p": 0.5, "seed": 7}, {"top_k": 20}, {"top_k": 3, "top_p": 0.9}, {"min_p": 0.2}, {},
    {"temperature": 0.0}, {"temperature": 0.0, "top_p": 0.3}, {"presence_penalty": 1.0}, {"logit_bias": {2: 9.0}},
    {"temperature": 1.5, "seed": 9},
]


def _params(settings: dict[str, object]) -> SamplingParams:
    return SamplingParams(max_tokens=64, **settings)


def _settings(subset: frozenset[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in subset:
        out |= FEATURES[name]
    return out


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # a peaked distribution


def _state(params: SamplingParams) -> SamplingState:
    """A fresh state (its generator at the seed's start) with prompt and output tokens for the penalties."""
    state = SamplingState(params, prompt_token_ids=[1, 5, 8, 13, 21])
    for t in (8, 30, 30, 2):
        state.append_token(t)
    return state


def _run(batch: list[SamplingParams], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The filtered logits [B, V] and the sampled tokens of one batch."""
    states = [_state(p) for p in batch]
    filtered = apply_temperature_and_filters(apply_penalties(logits, states, [4] * len(batch), EOS), batch)
    tokens = Sampler(seed=0)(logits, [_state(p) for p in batch], [4] * len(batch), EOS).token_ids
    return filtered, tokens


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "plain")
def test_row_samples_the_same_beside_any_neighbours(subset: frozenset[str]) -> None:
    row = _params(_settings(subset))
    row_logits = _logits(1, 1)
    alone_x, alone_t = _run([row], row_logits)
    assert (alone_x[0] > -math.inf).any()
    neighbours = [_params(s) for s in NEIGHBOURS]
    # (batch, the row's position, the neighbours' settings)
    batches = [([row, n], 0, [s]) for n, s in zip(neighbours, NEIGHBOURS, strict=True)]
    batches += [([n, row], 1, [s]) for n, s in zip(neighbours, NEIGHBOURS, strict=True)]
    batches.append(([*neighbours[:5], row, *neighbours[5:]], 5, NEIGHBOURS))
    for i, (batch, at, others) in enumerate(batches):
        logits = _logits(len(batch), 100 + i)
        logits[at] = row_logits[0]
        x, tokens = _run(batch, logits)
        context = f"row {sorted(subset)} at {at} beside {others}"
        assert torch.equal(x[at] == -math.inf, alone_x[0] == -math.inf), f"kept tokens differ: {context}"
        assert torch.equal(x[at], alone_x[0]), f"kept logits differ: {context}"
        if "seed" in subset:
            assert tokens[at] == alone_t[0], f"seeded draw differs: {context}"
