"""Hermes-style tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks in the generated
text (what SmolLM2-family and Qwen models write), parsed incrementally into content and tool-call deltas, and the
grammar that forces such calls for tool_choice "required" or a named function.

Streaming and non-streaming run the same parser (the latter over the whole text at once), so a streamed call's
argument pieces concatenate to exactly the non-streamed `arguments`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from server.openai.protocol import ChatTool, DeltaFunctionCall, DeltaToolCall, GrammarRequest

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
# The head of a call whose name comes first: once it is complete, the name is known and arguments can stream.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# Compact JSON inside the forced calls, as for response_format (see server/engine/grammar.py).
_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclasses.dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _suffix_prefix_len(text: str, token: str) -> int:
    """Length of the longest end of text that is a beginning of token (text that may start it)."""
    for k in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-k:]):
            return k
    return 0


class HermesToolParser:
    """Splits generated text into content and tool calls, one text delta at a time.

    NOTE: a block is a call only when its JSON parses (as vLLM's Hermes parser decides for a whole output); else it is
    content. So that a stream never starts a call that then turns out to be text, a block is held back until it closes
    (or the output ends) and then comes out whole. `forced` output (calls a grammar wrote) is known to parse, so there
    a call's arguments stream as written, and a call cut off by max_tokens keeps what it has (finish_reason says so).
    Without `parallel`, only the first call is returned and later ones are dropped (as vLLM).
    """

    def __init__(self, forced: bool = False, parallel: bool = True) -> None:
        self.calls: list[ParsedToolCall] = []
        self._forced = forced
        self._parallel = parallel
        self._buffer = ""  # text not yet turned into deltas
        self._in_call = False
        self._pending_space = ""  # whitespace of content, sent only if more content follows it
        self._layout = ""  # the whitespace before the open block: content again if the block is no call
        self._args_start: int | None = None  # where arguments begin in _buffer, once a forced call's head was sent
        self._args_sent = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        """Consume a text delta (`final`: the output ends with it); return the content it finalises and the tool-call
        deltas it completes, at most one per call (the openai SDK takes a second entry of an index for a new call)."""
        content, deltas = self._feed(text)
        if final:
            more, more_deltas = self._finish()
            content, deltas = content + more, deltas + more_deltas
        return content, _merged(deltas)

    def _feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self._buffer += text
        content: list[str] = []
        deltas: list[DeltaToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(CALL_START)
                if start < 0:
                    hold = _suffix_prefix_len(self._buffer, CALL_START)
                    content.append(self._content(self._buffer[:len(self._buffer) - hold]))
                    self._buffer = self._buffer[len(self._buffer) - hold:]
                    break
                content.append(self._content(self._buffer[:start]))
                self._layout, self._pending_space = self._pending_space, ""  # before a call it is layout, not content
                self._buffer = self._buffer[start + len(CALL_START):]
                self._in_call, self._args_start, self._args_sent = True, None, 0
                continue
            end = self._buffer.find(CALL_END)
            if end < 0:
                deltas += self._stream_call(self._buffer)
                break
            body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_END):]
            deltas += self._stream_call(body)  # the head, as a stream would have seen it
            complete, text_back = self._close_call(body, closed=True)
            deltas += complete
            content.append(self._content(text_back))
            self._in_call = False
        return "".join(content), deltas

    def _finish(self) -> tuple[str, list[DeltaToolCall]]:
        """The rest at the end of the output: an unclosed block is closed as far as it got."""
        if self._in_call:
            deltas = self._stream_call(self._buffer)
            more, text_back = self._close_call(self._buffer, closed=False)
            deltas += more
            self._buffer, self._in_call = "", False
            return self._content(text_back) + self._flush_space(), deltas
        rest, self._buffer = self._buffer, ""
        return self._content(rest) + self._flush_space(), []

    def _content(self, text: str) -> str:
        if not text:
            return ""
        if not text.strip():
            self._pending_space += text
            return ""
        stripped = text.rstrip()
        out = self._pending_space + stripped
        self._pending_space = text[len(stripped):]
        return out

    def _flush_space(self) -> str:
        # Trailing whitespace is content only when there are no calls (then the text is passed through as is).
        space, self._pending_space = self._pending_space, ""
        return "" if self.calls else space

    def _stream_call(self, body: str) -> list[DeltaToolCall]:
        """Deltas of an open forced call: its head once the name is known, then argument text that cannot be the
        call's closing brace (everything before the last '}' seen so far)."""
        deltas: list[DeltaToolCall] = []
        if not self._forced:
            return deltas
        if self._args_start is None:
            head = _HEAD.match(body)
            if head is None:
                return []
            name = json.loads(f'"{head.group(1)}"')
            self.calls.append(ParsedToolCall(_new_call_id(), name, ""))
            self._args_start = head.end()
            deltas.append(DeltaToolCall(index=len(self.calls) - 1, id=self.calls[-1].id, type="function",
                                        function=DeltaFunctionCall(name=name, arguments="")))
        safe = body.rfind("}")
        if safe > self._args_start:
            deltas += self._send_arguments(body[self._args_start:safe])
        return deltas

    def _send_arguments(self, arguments: str) -> list[DeltaToolCall]:
        piece = arguments[self._args_sent:]
        if not piece:
            return []
        self._args_sent = len(arguments)
        self.calls[-1].arguments = arguments
        return [DeltaToolCall(index=len(self.calls) - 1, function=DeltaFunctionCall(arguments=piece))]

    def _close_call(self, body: str, closed: bool) -> tuple[list[DeltaToolCall], str]:
        """Deltas that complete a call and the text to treat as content instead (a block that is no call)."""
        if self._args_start is None:
            parsed = _parse_call(body)
            if parsed is None:
                return [], self._layout + CALL_START + body + (CALL_END if closed else "")
            name, arguments = parsed
            if self.calls and not self._parallel:
                return [], ""
            self.calls.append(ParsedToolCall(_new_call_id(), name, arguments))
            return [DeltaToolCall(index=len(self.calls) - 1, id=self.calls[-1].id, type="function",
                                  function=DeltaFunctionCall(name=name, arguments=arguments))], ""
        rest = body[self._args_start:].rstrip()
        # The call object's own closing brace ends the body of a complete call; a cut-off one keeps all it has.
        if rest.endswith("}") and _parse_call(body) is not None:
            rest = rest[:-1].rstrip()
        return self._send_arguments(rest), ""


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call body, or None when it is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def _merged(deltas: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """The deltas with each run of one call's deltas joined into one."""
    out: list[DeltaToolCall] = []
    for delta in deltas:
        if not out or out[-1].index != delta.index:
            out.append(delta)
            continue
        first, more = out[-1].function, delta.function
        assert first is not None and more is not None, "every tool-call delta carries its function part"
        arguments = (first.arguments or "") + (more.arguments or "")
        out[-1] = out[-1].model_copy(update={"function": DeltaFunctionCall(name=first.name, arguments=arguments)})
    return out


def parse_tool_calls(text: str, forced: bool = False, parallel: bool = True) -> tuple[str | None, list[ParsedToolCall]]:
    """Content (None when empty and there are calls) and the calls of a whole output (see HermesToolParser)."""
    parser = HermesToolParser(forced, parallel)
    content, _ = parser.feed(text, final=True)
    return (content or None) if parser.calls else content, parser.calls


def forced_calls_grammar(tools: list[ChatTool], parallel: bool) -> str:
    """A Lark grammar for one call (or, with parallel, one or more) of the given tools, Hermes-style, whose
    arguments match each tool's parameters schema."""
    variants: list[dict[str, Any]] = [
        {"type": "object", "properties": {"name": {"const": t.function.name},
                                          "arguments": t.function.parameters_schema},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": _COMPACT}
    repeat = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{repeat}\n"
            f'call: "{CALL_START}\\n" body "\\n{CALL_END}"\n'
            f"body: %json {json.dumps(schema, ensure_ascii=False)}\n")  # name before arguments, as the head


def tool_calls_grammar(tools: list[ChatTool], named: str | None, parallel: bool) -> GrammarRequest:
    """The grammar that forces tool calls (tool_choice "required", or the function `named`); for "auto", the same
    grammar over all tools, compiled only to check their schemas."""
    if named is not None:
        return GrammarRequest("grammar", forced_calls_grammar([t for t in tools if t.function.name == named],
                                                              parallel=False), "tool_choice")
    return GrammarRequest("grammar", forced_calls_grammar(tools, parallel), "tools")
