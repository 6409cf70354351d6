"""server/engine/spec_verify.py against exact probabilities: greedy keeps the argmax prefix; sampling returns each
token with the distribution the plain sampler draws from (chi-square, with the power to see a 2% bias)."""

import math

import torch

from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams
from server.engine.spec_verify import verify

V = 6
EOS = 0


def test_greedy_keeps_the_argmax_prefix_and_adds_the_models_token() -> None:
    # Row j's argmax: 2, 3, 4 (then 5 for the bonus row of a sequence whose drafts all pass).
    logits = torch.eye(V)[[2, 3, 4, 5]] * 5  # [4, V]
    params = SamplingParams(temperature=0.0)
    for drafts, expected, rows in (([2, 3, 4], [2, 3, 4, 5], [0, 1, 2, 3]), ([2, 1, 4], [2, 3], [0, 1]),
                                   ([1, 3, 4], [2], [0])):
        out = verify(Sampler(), logits, [SamplingState(params)], [0], [drafts], EOS)
        assert out.token_ids == [expected] and out.rows == rows


def goodness_of_fit_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of counts [K] to probs [K] (cells with probability 0 must have no count)."""
    assert int(counts[probs == 0].sum()) == 0, (counts, probs)
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64), stat / 2))


def test_sampled_tokens_have_the_plain_distribution_at_every_position() -> None:
    """30,000 sequences drafting [a, b] over the same three rows: the first token ~ p0, the second (after a kept a)
    ~ p1, the third (after a kept a, b) ~ p2, each after the frequency penalty of the drafts before it, temperature
    and top-k."""
    a, b, num = 2, 3, 30_000
    rows = torch.tensor([[0.1, 0.5, 1.2, 0.9, -0.4, 0.3],
                         [0.2, 0.8, 0.4, 1.1, 0.0, -1.0],
                         [0.6, -0.3, 0.7, 0.2, 1.0, 0.4]], dtype=torch.float64)
    params = SamplingParams(temperature=0.7, top_k=4, frequency_penalty=0.6)

    def plain(row: torch.Tensor, seen: list[int]) -> torch.Tensor:
        x = row.clone()
        for t in seen:
            x[t] -= params.frequency_penalty
        x /= params.temperature
        x[x < x.topk(params.top_k).values[-1]] = -math.inf
        return x.softmax(-1)

    expected = [plain(rows[0], []), plain(rows[1], [a]), plain(rows[2], [a, b])]
    logits = rows.float().repeat(num, 1)  # [3 * num, V]
    states = [SamplingState(params) for _ in range(num)]
    out = verify(Sampler(seed=0), logits, states, [0] * num, [[a, b]] * num, EOS)
    first = torch.tensor([t[0] for t in out.token_ids])
    second = torch.tensor([t[1] for t in out.token_ids if t[0] == a])
    third = torch.tensor([t[2] for t in out.token_ids if t[:2] == [a, b]])
    for tokens, probs in zip((first, second, third), expected, strict=True):
        counts = torch.bincount(tokens, minlength=V).double()
        assert goodness_of_fit_p_value(counts, probs) > 1e-3, (counts / counts.sum(), probs)
    # The power: the first token's counts reject p0 with 2% of its mass moved from the draft to another token.
    biased = expected[0].clone()
    biased[a] -= 0.02
    biased[1] += 0.02
    assert goodness_of_fit_p_value(torch.bincount(first, minlength=V).double(), biased) < 1e-3
