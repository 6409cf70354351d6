"""SamplingParams: invalid values refused naming the field, normalised and frozen fields, per-choice seeds."""

import dataclasses
import math

import pytest

from server.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0), ("n", 17), ("n", 1.5),
        ("temperature", -0.1), ("temperature", 101.0), ("temperature", math.nan),
        ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
        ("top_k", -2), ("top_k", 1.0),
        ("min_p", -0.1), ("min_p", 1.1),
        ("presence_penalty", 2.5), ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0), ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
        ("logit_bias", {5: 101.0}), ("logit_bias", {5: -100.5}), ("logit_bias", {"x": 1.0}),
        ("logit_bias", ((1.5, 1.0),)),
        ("seed", 1.5), ("seed", 2**64),
        ("max_tokens", -1), ("prompt_logprobs", 21), ("max_tokens", -5),
        ("min_tokens", -1), ("min_tokens", 17),  # > max_tokens (16)
        ("stop_token_ids", (1, "a")),
        ("ignore_eos", 1),
        ("logprobs", -1), ("logprobs", 21),
        ("stop", ("",)),
    ],
)
def test_invalid_params_rejected_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_normalised_and_frozen() -> None:
    p = SamplingParams(logit_bias={"7": 2, 3: -1.5}, stop="END", stop_token_ids=[4, 5], top_k=-1)
    assert p.logit_bias == ((3, -1.5), (7, 2.0))
    assert p.stop == ("END",)
    assert p.stop_token_ids == (4, 5)
    hash(p)  # immutable fields only
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy


def test_child_params_for_n_get_distinct_seeds() -> None:
    p = SamplingParams(n=3, seed=2**64 - 1, temperature=0.5)
    kids = [p.child(i) for i in range(3)]
    assert [k.seed for k in kids] == [2**64 - 1, 0, 1]
    assert all(k.n == 1 and k.temperature == 0.5 for k in kids)
    assert SamplingParams(n=2).child(1).seed is None


def test_validate_token_ids_names_field() -> None:
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=(9,)).validate_token_ids(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).validate_token_ids(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(-1,)).validate_token_ids(10)
