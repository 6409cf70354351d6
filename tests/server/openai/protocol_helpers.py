"""Helpers of the protocol tests: a short chat and the (message, param) a request body is rejected with."""

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from server.openai.protocol import describe_validation_error

USER_HI = [{"role": "user", "content": "Hi"}]


def rejected(cls: type[BaseModel], body: Any, *, as_json: bool = False) -> tuple[str, str | None]:
    """The (message, param) a request body is rejected with."""
    with pytest.raises(ValidationError) as info:
        if as_json:
            cls.model_validate_json(json.dumps(body))
        else:
            cls.model_validate(body)
    return describe_validation_error(info.value)
