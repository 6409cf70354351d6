"""Logits processing: greedy ties, logit_bias, min_tokens, ignore_eos, penalties by formula, top_k/top_p/min_p and
temperature, the fast filters against a full-sort reference."""

import math

import pytest
import torch

from server.engine.logits_processors import apply_penalties, apply_temperature_and_filters
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams
from tests.server.engine.sampling_utils import DEVICES, EOS, _states

# ---- logits processing ----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_picks_argmax_first_on_ties(device: str) -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 2.0], [5.0, 0.0, 0.0, 0.0]], device=device)
    p = SamplingParams(temperature=0.0)
    out = Sampler()(logits, _states(p, p, device=device), [0, 0], EOS)
    assert out.token_ids == [1, 0]
    assert out.logprobs is None and out.top_logprobs is None


def test_logit_bias_forces_token() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    greedy = SamplingParams(temperature=0.0, logit_bias={4: 100.0})
    sampled = SamplingParams(temperature=1.0, logit_bias={4: 100.0})
    for _ in range(5):
        assert Sampler()(logits, _states(greedy, sampled), [0, 0], EOS).token_ids == [4, 4]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 10.0, 0.0]])  # EOS (3) best, stop id 2 next
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    x = apply_penalties(logits, _states(p), [1], EOS)
    assert x[0, 3] == -math.inf and x[0, 2] == -math.inf
    assert Sampler()(logits, _states(p), [1], EOS).token_ids == [0]
    assert Sampler()(logits, _states(p), [2], EOS).token_ids == [3]


def test_ignore_eos_does_not_mask_eos() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 10.0]])
    p = SamplingParams(temperature=0.0, ignore_eos=True)
    assert Sampler()(logits, _states(p), [0], EOS).token_ids == [EOS]


def test_penalties_match_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    state = SamplingState(p, prompt_token_ids=[0, 1, 0])
    for t in (2, 2, 3):
        state.append_token(t)
    assert state.output_counts == {2: 2, 3: 1}
    x = apply_penalties(logits, [state], [3], EOS)
    expected = [
        2.0 / 2,  # prompt token, positive: divided
        -1.0 * 2,  # prompt token, negative: multiplied
        3.0 / 2 - 0.5 * 2 - 0.25,  # generated twice
        -2.0 * 2 - 0.5 * 1 - 0.25,  # generated once
        0.5,  # unseen
        1.0,
    ]
    torch.testing.assert_close(x, torch.tensor([expected]))


def test_penalties_only_touch_rows_that_use_them() -> None:
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    plain = SamplingParams()
    states = [SamplingState(plain, [1, 2]), SamplingState(SamplingParams(presence_penalty=1.0)),
              SamplingState(plain, [1, 2])]
    for s in states:
        s.append_token(5)
    x = apply_penalties(logits, states, [1, 1, 1], EOS)
    assert torch.equal(logits, before)  # caller's tensor untouched
    assert torch.equal(x[[0, 2]], before[[0, 2]])
    assert x[1, 5] == before[1, 5] - 1.0


def test_logit_bias_added() -> None:
    logits = torch.zeros(1, 5)
    x = apply_penalties(logits, _states(SamplingParams(logit_bias={1: 2.5, 4: -3.0})), [0], EOS)
    torch.testing.assert_close(x, torch.tensor([[0.0, 2.5, 0.0, 0.0, -3.0]]))


def test_filters_top_k_top_p_min_p() -> None:
    # Probabilities 0.4, 0.3, 0.2, 0.1 in shuffled positions.
    logits = torch.tensor([[0.2, 0.4, 0.1, 0.3]]).log()

    def masked(p: SamplingParams) -> list[bool]:
        return (apply_temperature_and_filters(logits, [p])[0] == -math.inf).tolist()

    assert masked(SamplingParams(top_k=2)) == [True, False, True, False]
    assert masked(SamplingParams(top_p=0.65)) == [True, False, True, False]  # 0.4+0.3 >= 0.65
    assert masked(SamplingParams(top_p=0.75)) == [False, False, True, False]
    assert masked(SamplingParams(min_p=0.45)) == [False, False, True, False]  # keep p >= 0.18
    assert masked(SamplingParams(min_p=0.8)) == [True, False, True, True]
    assert masked(SamplingParams()) == [False] * 4


def test_temperature_divides_logits() -> None:
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    x = apply_temperature_and_filters(logits, [SamplingParams(temperature=0.5),
                                               SamplingParams(temperature=0.0)])
    torch.testing.assert_close(x, torch.tensor([[2.0, 4.0], [1.0, 2.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_1_and_tiny_top_p_equal_greedy(device: str) -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(1)).to(device)
    greedy = logits.argmax(-1).tolist()
    for p in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
              SamplingParams(temperature=2.0, top_k=1)):
        for _ in range(3):
            assert Sampler()(logits, _states(*[p] * 16, device=device), [0] * 16, EOS
                             ).token_ids == greedy


# ---- fast paths against plain references ------------------------------------------------------


def _reference_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k/top_p by one stable sort of the whole vocabulary, then min_p."""
    V = logits.shape[1]
    x = logits / torch.tensor([1.0 if p.greedy else p.temperature for p in params])[:, None]
    out = x.clone()
    for r, p in enumerate(params):
        if p.greedy:
            continue
        vals, order = x[r].sort(descending=True, stable=True)
        k = p.top_k if p.top_k > 0 else V
        vals = vals.masked_fill(torch.arange(V) >= k, -math.inf)
        probs = vals.softmax(-1)
        vals = vals.masked_fill(probs.cumsum(-1) - probs >= (p.top_p if p.top_p < 1 else math.inf), -math.inf)
        out[r] = torch.empty(V).scatter_(0, order, vals)
        if p.min_p > 0:
            out[r] = out[r].masked_fill(out[r] - out[r].max() < math.log(p.min_p), -math.inf)
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_filters_match_full_sort_reference(ties: bool) -> None:
    g = torch.Generator().manual_seed(7)
    V = 5000
    peaked = torch.randn(4, V, generator=g) * 4  # nucleus within the first candidates
    flat = torch.randn(4, V, generator=g) * 0.3  # nucleus wider than every candidate step: full sort
    logits = torch.cat((peaked, flat))
    if ties:
        logits = (logits * 2).round() / 2  # many equal logits, also at the top_k / top_p cuts
    cases = [
        [SamplingParams(top_k=k) for k in (1, 5, 40, 300)] * 2,
        [SamplingParams(top_p=p) for p in (0.1, 0.5, 0.9, 0.99)] * 2,
        [SamplingParams(top_k=k, top_p=p, temperature=0.7)
         for k, p in ((3, 0.5), (50, 0.9), (400, 0.95), (2, 1.0))] * 2,
        [SamplingParams(temperature=0.0), SamplingParams(top_k=7), SamplingParams(top_p=0.8),
         SamplingParams(min_p=0.2), SamplingParams(top_p=0.7, min_p=0.05), SamplingParams(), SamplingParams(top_k=1),
         SamplingParams(temperature=0.0, top_p=0.5)],
    ]
    for params in cases:
        for rows in (logits, logits[:4]):  # peaked rows alone: top_p stays within the first candidates
            got = apply_temperature_and_filters(rows, params[:len(rows)])
            want = _reference_filters(rows, params[:len(rows)])
            assert torch.equal(got == -math.inf, want == -math.inf)
            torch.testing.assert_close(got.masked_fill(got == -math.inf, 0), want.masked_fill(want == -math.inf, 0))
