"""The Hermes tool-call parser and the forced-call grammar (server/openai/tool_parsers.py)."""

import json

import pytest

from server.openai.protocol import ChatTool
from server.openai.tool_parsers import HermesToolParser, forced_calls_grammar, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "nested": {"a": [1, "}"]}}}\n</tool_call>'


def stream(text: str, size: int) -> tuple[str, dict[int, dict[str, str]], list[dict]]:
    """Feed text in pieces of `size` characters; the content, the accumulated calls and the raw deltas."""
    parser = HermesToolParser()
    content, calls, deltas = "", {}, []
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for piece in [*pieces, None]:
        got, call_deltas = parser.feed(piece) if piece is not None else parser.finish()
        content += got
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


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_concatenate_to_the_whole_result(size: int) -> None:
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo")
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Oslo", "nested": {"a": [1, "}"]}}
    s_content, s_calls, _ = stream(text, size)
    assert s_content == content
    assert [(c["name"], c["arguments"]) for c in s_calls.values()] == [(c.name, c.arguments) for c in calls]


def test_arguments_stream_before_the_call_closes() -> None:
    head = '<tool_call>\n{"name": "f", "arguments": {"q": "long text'
    parser = HermesToolParser()
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


def test_a_cut_off_call_keeps_what_it_has() -> None:
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1')
    assert content is None and calls[0].name == "f" and calls[0].arguments == '{"a": 1'


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
