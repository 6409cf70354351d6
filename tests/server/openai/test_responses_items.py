"""The Responses output-item builder (server/openai/responses_items.py): the items and the events that build them,
fed the whole output at once (as a slow reader gets it) or a character at a time (as a stream may)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from server.openai.protocol import ChatCompletionLogprob
from server.openai.protocol.responses_output import OutputMessage
from server.openai.responses_items import OutputItems
from server.openai.tool_parsers import HermesToolParser

CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
MALFORMED = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'


def build(text: str, pieces: int | None, parse_tools: bool = True,
          parallel: bool = True) -> tuple[list[dict[str, Any]], list[Any]]:
    """(items without ids, events) for `text` fed whole (pieces None) or in pieces of that many characters."""
    items = OutputItems(itertools.count(), HermesToolParser(parallel=parallel) if parse_tools else None)
    size = pieces or max(len(text), 1)
    chunks = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    events = []
    for i, chunk in enumerate(chunks):
        events += items.feed(chunk, finished=i == len(chunks) - 1)
    events += items.finish("completed")
    return [item.model_dump(exclude={"id", "call_id"}) for item in items.items], events


def check_events(events: list[Any], items: list[dict[str, Any]]) -> None:
    """Sequence numbers count up; each item opens, grows by deltas that add up to it, and closes in order."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    opened = [e.output_index for e in events if e.type == "response.output_item.added"]
    closed = [e for e in events if e.type == "response.output_item.done"]
    assert opened == [e.output_index for e in closed] == list(range(len(items)))
    assert [e.item.model_dump(exclude={"id", "call_id"}) for e in closed] == items
    for index, item in enumerate(items):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        first, last = mine[0], mine[-1]
        assert first.type == "response.output_item.added" and last.type == "response.output_item.done"
        assert all(e.sequence_number < mine[k + 1].sequence_number for k, e in enumerate(mine[:-1]))
        if item["type"] == "message":
            types = [e.type for e in mine]
            assert types[:2] == ["response.output_item.added", "response.content_part.added"]
            assert types[-3:] == ["response.output_text.done", "response.content_part.done",
                                  "response.output_item.done"]
            deltas = "".join(e.delta for e in mine if e.type == "response.output_text.delta")
            assert deltas == item["content"][0]["text"] == mine[-3].text
        else:
            deltas = "".join(e.delta for e in mine if e.type == "response.function_call_arguments.delta")
            done = mine[-2]
            assert done.type == "response.function_call_arguments.done"
            assert deltas == done.arguments == item["arguments"] and done.name == item["name"]


@pytest.mark.parametrize("text", [
    "Hello there.",
    "",
    CALL,
    f"I will check. {CALL}",
    f"{CALL}\n{CALL2}",
    f"First. {CALL} Then more text.",
    "<tool_call> not a call </tool_call> and text",
    "a <b>bold</b> x > y <tool_c",
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UT',  # cut off: no call, so text
    MALFORMED,
    f"{MALFORMED} then {CALL}",
])
@pytest.mark.parametrize("pieces", [None, 1, 3, 7])
def test_items_and_events(text: str, pieces: int | None) -> None:
    items, events = build(text, pieces)
    check_events(events, items)
    assert all(item["status"] == "completed" for item in items)
    if pieces is not None:
        assert items == build(text, None)[0]  # a stream builds what one piece builds


def test_what_the_items_hold() -> None:
    items, _ = build(f"First. {CALL} Then more text.", 1)
    assert [(i["type"], i.get("name")) for i in items] == [("message", None), ("function_call", "get_time"),
                                                         ("message", None)]
    assert items[0]["content"][0]["text"] == "First." and items[2]["content"][0]["text"] == " Then more text."
    assert json.loads(items[1]["arguments"]) == {"zone": "UTC"}
    assert build("", None)[0] == [{"type": "message", "role": "assistant", "status": "completed", "content": [
        {"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}]
    # Without tools in play, a call is text.
    assert build(CALL, 2, parse_tools=False)[0][0]["content"][0]["text"] == CALL


@pytest.mark.parametrize("pieces", [None, 1, 5])
def test_a_block_that_does_not_parse_is_message_text(pieces: int | None) -> None:
    items, events = build(f"Checking. {MALFORMED}", pieces)
    assert [i["type"] for i in items] == ["message"] and items[0]["content"][0]["text"] == f"Checking. {MALFORMED}"
    assert not any(e.type.startswith("response.function_call") for e in events)


@pytest.mark.parametrize("pieces", [None, 1, 5])
def test_without_parallel_calls_only_the_first_call_is_an_item(pieces: int | None) -> None:
    items, _ = build(f"First. {CALL}\n{CALL2} Done.", pieces, parallel=False)
    assert [(i["type"], i.get("name")) for i in items] == [("message", None), ("function_call", "get_time"),
                                                         ("message", None)]
    assert items[2]["content"][0]["text"] == " Done."


def test_an_incomplete_output_marks_its_last_item() -> None:
    items = OutputItems(itertools.count(), HermesToolParser())
    items.feed(f"Sure. {CALL} and", finished=True)
    items.finish("incomplete")
    assert [i.status for i in items.items] == ["completed", "completed", "incomplete"]


def test_logprobs_of_tokens_that_add_no_text_are_in_no_event() -> None:
    def entry(token: str) -> ChatCompletionLogprob:
        return ChatCompletionLogprob(token=token, logprob=-1.0, bytes=list(token.encode()))

    items = OutputItems(itertools.count(), None)
    events = items.feed("Hi", finished=False, logprobs=[entry("H"), entry("i")])
    events += items.feed("", finished=True, logprobs=[entry("<|im_end|>")])  # an EOS: counted, but no text
    events += items.finish("completed")
    deltas = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert deltas == [lp.token for lp in done.logprobs] == ["H", "i"]
    [message] = items.items
    assert isinstance(message, OutputMessage) and [lp.token for lp in message.content[0].logprobs] == ["H", "i"]
