"""Completion requests of server/openai/protocol/: defaults, accepted forms, every invalid field named in the error."""

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from server.openai.protocol import CompletionRequest, describe_validation_error
from tests.server.openai.protocol_helpers import rejected


def test_minimal_completion_request_defaults() -> None:
    req = CompletionRequest.model_validate({"prompt": "Hello"})
    assert req.model is None and req.prompts == ["Hello"]
    assert (req.max_tokens, req.temperature, req.top_p, req.n) == (16, 1.0, 1.0, 1)
    assert (req.top_k, req.min_p, req.repetition_penalty, req.min_tokens) == (0, 0.0, 1.0, 0)
    assert req.logprobs is None and not req.echo and not req.stream and req.stream_options is None
    assert req.stop_strings == [] and req.skip_special_tokens and not req.include_stop_str_in_output


def test_benchmark_client_body_is_accepted() -> None:
    body = {
        "model": "customllm", "prompt": "x" * 50, "temperature": 0.0, "max_tokens": 128,
        "ignore_eos": True, "stop": None, "logprobs": None, "best_of": 1, "repetition_penalty": 1.0,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    parsed = [CompletionRequest.model_validate(body), CompletionRequest.model_validate_json(json.dumps(body))]
    for req in parsed:
        assert req.ignore_eos and req.stream_options is not None
        assert req.stream_options.include_usage and req.stream_options.continuous_usage_stats
        assert req.max_tokens == 128 and req.temperature == 0.0


def test_null_takes_the_default() -> None:
    req = CompletionRequest.model_validate(
        {"prompt": "x", "temperature": None, "top_p": None, "n": None, "max_tokens": None, "echo": None}
    )
    assert (req.temperature, req.top_p, req.n, req.max_tokens, req.echo) == (1.0, 1.0, 1, 16, False)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts == expected


def test_stop_and_logit_bias_forms() -> None:
    body = {"prompt": "x", "stop": "\n", "logit_bias": {"50": -100, "7": 2.5}}
    req = CompletionRequest.model_validate(body)
    assert req.stop_strings == ["\n"]
    assert req.logit_bias == {50: -100.0, 7: 2.5}
    req = CompletionRequest.model_validate_json('{"prompt": "x", "stop": ["a", "b"], "logit_bias": {"3": 1}}')
    assert req.stop_strings == ["a", "b"] and req.logit_bias == {3: 1.0}


COMPLETION_INVALID = [
    ("prompt", ""),
    ("prompt", []),
    ("prompt", 3),
    ("prompt", [""]),
    ("prompt", [[]]),
    ("prompt", [1, -1]),
    ("prompt", [1, "a"]),
    ("prompt", [True]),
    ("prompt", [1.5]),
    ("model", 5),
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", "16"),
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("temperature", "0.5"),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", 0),
    ("top_p", 1.5),
    ("n", 0),
    ("n", 17),
    ("stream", "yes"),
    ("stream", 1),
    ("stream_options", {"include_usage": "yes"}),
    ("stream_options", "usage"),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", True),
    ("echo", 1),
    ("stop", 5),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["a", 1]),
    ("stop", ["a"] * 17),
    ("stop", "x" * 257),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", [1, 2]),
    ("seed", 2**64),
    ("seed", "1"),
    ("user", 5),
    ("top_k", -2),
    ("min_p", 1.5),
    ("repetition_penalty", 0),
    ("min_tokens", -1),
    ("ignore_eos", "true"),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "2"),
    ("skip_special_tokens", 0),
    ("include_stop_str_in_output", "no"),
    ("best_of", 2),
    ("best_of", 0),
    ("suffix", "after"),
]


@pytest.mark.parametrize(("field", "value"), COMPLETION_INVALID)
def test_invalid_completion_field_is_named(field: str, value: Any) -> None:
    body = {"prompt": "x", field: value}
    message, param = rejected(CompletionRequest, body)
    assert param is not None and param.split(".")[0].split("[")[0] == field, (message, param)
    assert field in message, message


# NaN and infinity have no standard JSON spelling.
JSON_INVALID = [(f, v) for f, v in COMPLETION_INVALID if not isinstance(v, float) or math.isfinite(v)]


@pytest.mark.parametrize(("field", "value"), JSON_INVALID)
def test_invalid_completion_field_is_named_json(field: str, value: Any) -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", field: value}, as_json=True)
    assert param is not None and param.startswith(field) and field in message, (message, param)


def test_unknown_fields_are_named() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "frobnicate": 1})
    assert param == "frobnicate" and "frobnicate" in message and "Unrecognized" in message
    message, param = rejected(CompletionRequest, {"prompt": "x", "stream": True, "stream_options": {"x": 1}})
    assert param == "stream_options.x" and "stream_options.x" in message


def test_missing_prompt_is_named() -> None:
    message, param = rejected(CompletionRequest, {"max_tokens": 3})
    assert param == "prompt" and "prompt" in message


def test_stream_options_need_stream() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}})
    assert param == "stream_options" and "stream" in message
    ok = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    assert CompletionRequest.model_validate(ok).stream_options is not None


def test_min_tokens_must_not_exceed_max_tokens() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "max_tokens": 4, "min_tokens": 5})
    assert param == "min_tokens" and "max_tokens" in message
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": 5, "min_tokens": 5}).min_tokens == 5


def test_max_tokens_zero_only_with_echo() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "max_tokens": 0})
    assert param == "max_tokens" and "echo" in message
    req = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert req.max_tokens == 0 and req.echo


def test_best_of_and_suffix_only_when_harmless() -> None:
    harmless = [{"best_of": None}, {"best_of": 1}, {"best_of": 3, "n": 3}, {"suffix": None}, {"suffix": ""}]
    for extra in harmless:
        CompletionRequest.model_validate({"prompt": "x", **extra})
    assert "not supported" in rejected(CompletionRequest, {"prompt": "x", "best_of": 4, "n": 2})[0]
    assert "not supported" in rejected(CompletionRequest, {"prompt": "x", "suffix": "}"})[0]


def test_error_message_counts_further_errors_and_shows_value() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "temperature": 9, "top_p": 9})
    assert param == "temperature" and "(got 9)" in message and "1 more error" in message


def test_body_that_is_not_an_object() -> None:
    message, param = rejected(CompletionRequest, ["prompt"])
    assert param is None and message.startswith("Invalid request body")
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(b'{"prompt": ')
    assert describe_validation_error(info.value)[0].startswith("Invalid request body: Invalid JSON")
