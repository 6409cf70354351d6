"""Tokenize and detokenize requests of server/openai/protocol/: accepted forms and the field each error names."""

from server.openai.protocol import DetokenizeRequest, TokenizeRequest
from tests.server.openai.protocol_helpers import USER_HI, rejected


def test_tokenize_request_forms() -> None:
    assert TokenizeRequest.model_validate({"prompt": "hi"}).prompt == "hi"
    req = TokenizeRequest.model_validate({"messages": USER_HI, "add_generation_prompt": False})
    assert req.messages is not None and not req.add_generation_prompt
    for body in ({}, {"prompt": "x", "messages": USER_HI}):
        message, param = rejected(TokenizeRequest, body)
        assert param == "prompt" and "messages" in message
    message, param = rejected(TokenizeRequest, {"prompt": "x", "add_generation_prompt": True})
    assert param == "add_generation_prompt"
    assert rejected(TokenizeRequest, {"prompt": "x", "bogus": 1})[1] == "bogus"


def test_detokenize_request() -> None:
    assert DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]
    assert DetokenizeRequest.model_validate({"tokens": []}).tokens == []
    for tokens in ([-1], ["1"], "12", None):
        message, param = rejected(DetokenizeRequest, {"tokens": tokens})
        assert param is not None and param.startswith("tokens") and "tokens" in message
