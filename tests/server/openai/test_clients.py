"""Agent and structured-output frameworks against this server over real HTTP: LangChain, instructor, pydantic-ai
and the OpenAI Agents SDK, on the closing-biased tiny checkpoint (tests/server/openai/biased.py)."""

import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.server.live import LiveServer
from tests.server.openai.biased import biased_checkpoint, oai, server  # noqa: F401  (fixtures)


class City(BaseModel):
    name: str
    population: int


def get_weather(city: str) -> str:
    """Get the weather in a city."""
    return f"sunny in {city}"


def base(server: LiveServer) -> str:
    return f"{server.base_url}/v1"


def test_langchain_structured_output_both_methods(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="customllm", base_url=base(server), api_key="x", max_tokens=150, seed=1,
                     max_retries=0)
    out = llm.with_structured_output(City, method="json_schema").invoke("Name a city")
    assert isinstance(out, City), out
    # json_mode sends response_format json_object, which promises an object, not the schema's fields.
    raw = llm.with_structured_output(City, method="json_mode", include_raw=True).invoke("Name a city as JSON")
    assert isinstance(json.loads(raw["raw"].content), dict)


def test_langchain_bind_tools_required(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="customllm", base_url=base(server), api_key="x", max_tokens=150, seed=2, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="required").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert set(msg.tool_calls[0]["args"]) == {"city"}


@pytest.mark.parametrize("mode", ["JSON", "TOOLS", "JSON_SCHEMA"])
def test_instructor_modes(oai: openai.OpenAI, mode: str) -> None:
    import instructor
    from instructor.v2.core.errors import InstructorRetryException

    client = instructor.from_openai(oai, mode=getattr(instructor.Mode, mode))
    kwargs: dict[str, Any] = dict(model="customllm", response_model=City, max_retries=0, max_tokens=150, seed=3,
                                  messages=[{"role": "user", "content": "A city?"}])
    if mode != "JSON":
        assert isinstance(client.chat.completions.create(**kwargs), City)
        return
    # JSON mode sends response_format json_object: an object is guaranteed, the schema's fields are not.
    try:
        client.chat.completions.create(**kwargs)
    except InstructorRetryException as exc:
        assert isinstance(json.loads(exc.last_completion.choices[0].message.content), dict)


def test_pydantic_ai_output_type(server: LiveServer) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("customllm", provider=OpenAIProvider(base_url=base(server), api_key="x"))
    agent: Agent[None, City] = Agent(model, output_type=City, model_settings={"max_tokens": 150, "seed": 4})
    assert isinstance(agent.run_sync("A city?").output, City)


def test_openai_agents_function_tool(server: LiveServer) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Get the weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    client = openai.AsyncOpenAI(base_url=base(server), api_key="x", max_retries=0)
    agent = Agent(name="a", instructions="Use the tool.", tools=[weather],
                  model=OpenAIChatCompletionsModel(model="customllm", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=120),
                  tool_use_behavior="stop_on_first_tool")
    result: Any = Runner.run_sync(agent, "Weather in Oslo?", max_turns=3)
    assert len(calls) == 1 and result.final_output == f"sunny in {calls[0]}"
