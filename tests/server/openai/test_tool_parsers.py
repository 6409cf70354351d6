"""The Hermes tool-call parser and the forced-call grammar (server/openai/tool_parsers.py)."""

import json

import pytest

from server.openai.protocol import ChatTool
from server.openai.tool_parsers import HermesToolParser, forced_calls_grammar, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "nested": {"a": [1, "}"]}}}\n</tool_call>'


def stream(text: str, size: int, **kwargs: bool) -> tuple[str, dict[int, dict[str, str]], list[dict]]:
    """Feed text in pieces of `size` characters to a parser made with kwargs; the content, the accumulated calls and
    the raw deltas."""
    parser = HermesToolParser(**kwargs)
    content, calls, deltas = "", {}, []
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    for i, piece in enumerate(pieces):
        got, call_deltas = parser.feed(piece, final=i == len(pieces) - 1)
        content += got
        assert len({d.index for d in call_deltas}) == len(call_deltas), "at most one delta per call in a feed"
        for d in call_deltas:
            deltas.append(d.model_dump())
            acc = calls.setdefault(d.index, {"name": "", "arguments": "", "id": ""})
            if d.id is not None:
                assert not acc["id"], "id only in the first delta of a call"
                acc["id"] = d.id
                assert d.function is not None and d.function.name and d.type == "function"
            elif d.function is not None:
                assert d.function.name is None, "name only in the first delta of a call"
            acc["name"] += (d.function.name or "") if d.function else ""
            acc["arguments"] += (d.function.arguments or "") if d.function else ""
    return content, calls, deltas


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_concatenate_to_the_whole_result(size: int, forced: bool) -> None:
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo")
    content, calls = parse_tool_calls(text, forced=forced)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Oslo", "nested": {"a": [1, "}"]}}
    s_content, s_calls, _ = stream(text, size, forced=forced)
    assert s_content == content
    assert [(c["name"], c["arguments"]) for c in s_calls.values()] == [(c.name, c.arguments) for c in calls]


def test_forced_arguments_stream_before_the_call_closes() -> None:
    head = '<tool_call>\n{"name": "f", "arguments": {"q": "long text'
    parser = HermesToolParser(forced=True)
    _, deltas = parser.feed(head)
    assert deltas and deltas[0].function is not None and deltas[0].function.name == "f"
    _, more = parser.feed(' more"}, ')
    assert "".join(d.function.arguments or "" for d in more if d.function) == '{"q": "long text more"'


def test_text_without_calls_passes_through_unchanged() -> None:
    for text in ["plain answer", "a < b and <tool", "  spaced  \n", "x <tool_call"]:
        assert parse_tool_calls(text) == (text, [])
        assert stream(text, 1)[0] == text


def test_a_block_that_is_no_call_is_content() -> None:
    text = "<tool_call>\nnot json\n</tool_call>"
    assert parse_tool_calls(text) == (text, [])


def test_a_cut_off_forced_call_keeps_what_it_has() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1'
    content, calls = parse_tool_calls(text, forced=True)
    assert content is None and calls[0].name == "f" and calls[0].arguments == '{"a": 1'
    assert parse_tool_calls(text) == (text, [])  # not forced: not known to be a call, so text
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}')  # only the tag missing
    assert content is None and calls[0].arguments == '{"a": 1}'


def test_arguments_first_is_parsed_when_the_call_closes() -> None:
    content, calls = parse_tool_calls('<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>')
    assert content is None and (calls[0].name, json.loads(calls[0].arguments)) == ("f", {"a": 1})


def test_forced_grammar_lists_each_tool_with_name_first() -> None:
    tools = [ChatTool.model_validate({"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}) for n in ("a", "b")]
    one = forced_calls_grammar(tools[:1], parallel=False)
    assert one.startswith("start: call\n") and '"name": {"const": "a"}' in one
    many = forced_calls_grammar(tools, parallel=True)
    assert 'start: call ("\\n" call)*' in many and '"anyOf"' in many
    schema = json.loads(many.split("%json ", 1)[1])
    assert list(schema["anyOf"][0]["properties"]) == ["name", "arguments"]


PING = '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
MALFORMED = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("size", [1, 5, 1000])
def test_one_delta_per_call_in_each_feed(forced: bool, size: int) -> None:
    # The openai SDK starts a new call for a second entry of one index in a chunk (issue 26, item 11).
    text = "Sure. " + PING + "\n" + CALL
    parser = HermesToolParser(forced=forced)
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for i, piece in enumerate(pieces):
        _, deltas = parser.feed(piece, final=i == len(pieces) - 1)
        indexes = [d.index for d in deltas]
        assert len(indexes) == len(set(indexes)), deltas
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in parse_tool_calls(text)[1]]
    assert parser.calls[0].arguments == "{}"


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_without_parallel_calls_only_the_first_is_returned(size: int) -> None:
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo") + " Done."
    content, calls = parse_tool_calls(text, parallel=False)
    assert content == "Let me check. Done." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]
    s_content, s_calls, _ = stream(text, size, parallel=False)
    assert s_content == content and [(c["name"], c["arguments"]) for c in s_calls.values()] == [
        (c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_a_block_whose_json_does_not_parse_is_content(size: int) -> None:
    for text in [MALFORMED, f"Checking. {MALFORMED}"]:
        assert parse_tool_calls(text) == (text, [])
        assert stream(text, size)[0] == text and stream(text, size)[2] == []  # no call started, not even its name
    text = f"{MALFORMED}\n{CALL}"
    content, calls = parse_tool_calls(text)
    assert content == MALFORMED and [c.name for c in calls] == ["get_weather"] and json.loads(calls[0].arguments)
    s_content, s_calls, deltas = stream(text, size)
    assert s_content == content and [(c["name"], c["arguments"]) for c in s_calls.values()] == [
        (c.name, c.arguments) for c in calls]
    assert len([d for d in deltas if d["id"]]) == 1
