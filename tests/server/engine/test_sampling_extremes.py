"""Issue 26.8/26.9: every sampling parameter at the ends of its accepted range gives what a float64 computation
of the documented pipeline gives (docs/limits.md, "Sampling fields"), and values beyond them are refused naming
the field."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.logits_processors import apply_penalties, apply_temperature_and_filters
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams

EOS = 3
VOCAB = 600
PROMPT = [1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121, 144, 169, 196, 225, 256, 289, 324, 361, 400]
OUTPUT = [7, 7, 64, 300, 2]  # generated so far


def _reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The documented pipeline in float64 for one row [V]: logit_bias, penalties, temperature, top_k, top_p,
    min_p; filtered tokens are -inf. Greedy rows stop after the penalties."""
    x = logits.double().clone()
    for t, b in p.logit_bias:
        x[t] += b
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=len(x)).double()
    seen = counts > 0
    rep_seen = seen.clone()
    rep_seen[PROMPT] = True
    rep = p.repetition_penalty
    x = torch.where(rep_seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - p.frequency_penalty * counts - p.presence_penalty * seen.double()
    if p.greedy:
        return x
    x = x / p.temperature
    vals, order = x.sort(descending=True, stable=True)
    if 0 < p.top_k < len(x):
        vals[p.top_k:] = -math.inf
    probs = vals.softmax(-1)
    if p.top_p < 1:
        vals[1:][(probs.cumsum(-1) - probs)[1:] >= p.top_p] = -math.inf  # the top token always stays
    x = torch.empty_like(x).scatter_(0, order, vals)
    if p.min_p > 0:
        x[x - x.max() < math.log(p.min_p)] = -math.inf
    return x


def _state(p: SamplingParams) -> SamplingState:
    state = SamplingState(p, prompt_token_ids=PROMPT)
    for t in OUTPUT:
        state.append_token(t)
    return state


def _sample(logits: torch.Tensor, p: SamplingParams) -> int:
    return Sampler(seed=0)(logits[None], [_state(p)], [len(OUTPUT)], EOS).token_ids[0]


def _kept(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The tokens the sampler may draw [V] (bool)."""
    x = apply_penalties(logits[None], [_state(p)], [len(OUTPUT)], EOS)
    return apply_temperature_and_filters(x, [p])[0] > -math.inf


def _reference_draw(logits: torch.Tensor, p: SamplingParams) -> int:
    """The reference token: the argmax for a greedy row, else the race over the same Exp(1) noise as the sampler's
    seeded draw."""
    x = _reference(logits, p)
    if p.greedy:
        return int(x.argmax())
    assert p.seed is not None
    noise = torch.empty(len(x)).exponential_(generator=torch.Generator().manual_seed(p.seed))
    return int((x - noise.double().log()).argmax())


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


EXTREMES: list[dict[str, object]] = [
    {"temperature": 0.0}, {"temperature": 5e-324}, {"temperature": 9.999e-6},  # below 1e-5: greedy
    {"temperature": 1e-5}, {"temperature": 2.0}, {"temperature": 100.0},
    {"top_p": 5e-324}, {"top_p": 1e-300}, {"top_p": 1e-46}, {"top_p": 1e-45}, {"top_p": 1.0},
    {"top_k": 1}, {"top_k": VOCAB - 1}, {"top_k": VOCAB}, {"top_k": 2**63 - 1}, {"top_k": 2**63}, {"top_k": 10**30},
    {"top_k": 2**64, "top_p": 0.9}, {"top_k": 10**30, "top_p": 1e-46}, {"top_k": VOCAB + 1, "top_p": 0.5},
    {"min_p": 5e-324}, {"min_p": 1e-46}, {"min_p": 1e-30}, {"min_p": 1.0},
    {"presence_penalty": -2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": -2.0}, {"frequency_penalty": 2.0},
    {"repetition_penalty": 0.01}, {"repetition_penalty": 100.0}, {"repetition_penalty": 1e-3},
    {"repetition_penalty": 1e-37}, {"repetition_penalty": 1e-38}, {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300}, {"repetition_penalty": 1e-300, "temperature": 1e-5},
    {"logit_bias": {10: 100.0, 11: -100.0, 12: 100.0}}, {"logit_bias": {t: -100.0 for t in range(VOCAB - 1)}},
    # Everything extreme at once: the largest logits any accepted values make, at the smallest sampled temperature.
    {"temperature": 1e-5, "repetition_penalty": 0.01, "logit_bias": {4: 100.0, 9: 100.0}, "frequency_penalty": -2.0,
     "presence_penalty": -2.0, "min_p": 5e-324, "top_p": 5e-324},
    {"temperature": 100.0, "repetition_penalty": 100.0, "logit_bias": {4: -100.0}, "frequency_penalty": 2.0,
     "top_k": 2**64, "top_p": 1.0, "min_p": 1.0},
]


@pytest.mark.parametrize("settings", EXTREMES, ids=lambda s: ",".join(f"{k}={v}"[:40] for k, v in s.items()))
@pytest.mark.parametrize("scale", [3.0, 60.0])  # a wide logit spread: tiny min_p values matter
def test_extremes_equal_a_float64_reference(settings: dict[str, object], scale: float) -> None:
    for seed in range(4):
        logits = _logits(seed, scale)
        for greedy in (False, True):
            p = SamplingParams(seed=seed, **settings | ({"temperature": 0.0} if greedy else {}))
            assert _sample(logits, p) == _reference_draw(logits, p), (seed, p)
            if not greedy:
                assert torch.equal(_kept(logits, p), _reference(logits, p) > -math.inf), (seed, p)


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
def test_a_nucleus_keeps_the_top_token_whatever_top_p(top_p: float) -> None:
    """26.8: a top_p that is 0 in float32 used to mask every token, and the draw ended the sample with token 0."""
    logits = _logits(0)
    assert int(logits.argmax()) != 0
    for seed in range(5):
        assert _sample(logits, SamplingParams(top_p=top_p, seed=seed)) == int(logits.argmax())


@pytest.mark.parametrize(("field", "value"), [
    ("repetition_penalty", 0.0), ("repetition_penalty", -1e-300), ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
])
def test_values_past_the_range_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_negative_seeds_draw_as_their_64_bit_twos_complement() -> None:
    logits = _logits(1)
    for seed in (-(2**63), -1):
        draws = [_sample(_logits(s), SamplingParams(seed=seed)) for s in range(6)]
        assert draws == [_sample(_logits(s), SamplingParams(seed=seed + 2**64)) for s in range(6)]
    assert _sample(logits, SamplingParams(seed=2**64 - 1)) == _reference_draw(logits, SamplingParams(seed=2**64 - 1))
