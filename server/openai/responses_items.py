"""The output items of one response, built from generated text as it arrives, and the stream events that build them.

Text goes into a `message` item, tool calls (parsed by server/openai/tool_parsers.py) into `function_call` items, in
the order they were written. An item is opened by `response.output_item.added` (a message also gets its
`output_text` part: `response.content_part.added`), grows by deltas, and is closed (`*.done` events) when the next
item starts or the output ends. A non-streaming request runs the same builder and drops the events, so both
paths answer the same items.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from server.openai.protocol import ChatCompletionLogprob, DeltaToolCall
from server.openai.protocol.responses_output import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallOutput,
    ItemStatus,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from server.openai.tool_parsers import HermesToolParser

_AFTER_TAG_END = re.compile(r"(?<=>)")


class OutputItems:
    """Output items under construction; `sequence` numbers every event of the response in order. With a `parser`,
    tool calls are parsed out of the text (the tools are in play)."""

    def __init__(self, sequence: Iterator[int], parser: HermesToolParser | None) -> None:
        self.items: list[OutputItem] = []
        self._sequence = sequence
        self._open: OutputItem | None = None
        self._pending_logprobs: list[ChatCompletionLogprob] = []
        self._parser = parser

    def feed(self, text: str, finished: bool, logprobs: Sequence[ChatCompletionLogprob] = ()) -> list[ResponseEvent]:
        """Events for generated text (`finished`: the output ends with it; what the parser holds back comes out), and
        the logprobs of the tokens that made it (without tools in play: the request's checks see to that)."""
        if self._parser is None:
            return self.text(text, logprobs)
        assert not logprobs, "no logprobs with tools in play"
        events: list[ResponseEvent] = []
        # One parser feed returns its content and its calls apart, so it must not hold both a call's end and the text
        # after it (the text would come first): the text is cut after every '>', which ends any closing tag.
        pieces = _AFTER_TAG_END.split(text)
        for i, piece in enumerate(pieces):
            content, calls = self._parser.feed(piece, final=finished and i == len(pieces) - 1)
            events += self.text(content) + self.calls(calls)
        return events

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def text(self, text: str, logprobs: Sequence[ChatCompletionLogprob] = ()) -> list[ResponseEvent]:
        """Events for content text (opening a message item if the open item is not one). Logprobs of tokens that
        add no text wait for the next delta; those no text follows (the EOS that ends the output) go in no event,
        so a text's deltas carry exactly the logprobs of its done event."""
        self._pending_logprobs += logprobs
        if not text:
            return []
        events = [] if isinstance(self._open, OutputMessage) else self._open_message()
        message = self._open
        assert isinstance(message, OutputMessage)
        lp, self._pending_logprobs = self._pending_logprobs, []
        message.content[0].text += text
        message.content[0].logprobs += lp
        events.append(TextDeltaEvent(type="response.output_text.delta", sequence_number=next(self._sequence),
                                     item_id=message.id, output_index=self._index, content_index=0, delta=text,
                                     logprobs=lp))
        return events

    def calls(self, deltas: list[DeltaToolCall]) -> list[ResponseEvent]:
        """Events for tool-call deltas: a delta with an id starts a call, the others add to its arguments."""
        events: list[ResponseEvent] = []
        for delta in deltas:
            assert delta.function is not None, "every tool-call delta carries its function part"
            if delta.id is not None:
                assert delta.function.name is not None, "a call's first delta names its function"
                events += self._close("completed")
                call = FunctionCallOutput(call_id=delta.id, name=delta.function.name)
                self.items.append(call)
                self._open = call
                events.append(OutputItemEvent(type="response.output_item.added", sequence_number=next(self._sequence),
                                              output_index=self._index, item=call.model_copy(deep=True)))
            current = self._open
            assert isinstance(current, FunctionCallOutput), "argument deltas follow their call's first delta"
            if delta.function.arguments:
                current.arguments += delta.function.arguments
                events.append(ArgumentsDeltaEvent(type="response.function_call_arguments.delta",
                                                  sequence_number=next(self._sequence), item_id=current.id,
                                                  output_index=self._index, delta=delta.function.arguments))
        return events

    def finish(self, status: ItemStatus) -> list[ResponseEvent]:
        """Close the open item with `status` (an output with nothing in it is one empty message)."""
        events = self._open_message() if not self.items else []
        return events + self._close(status)

    def _open_message(self) -> list[ResponseEvent]:
        events = self._close("completed")
        message = OutputMessage()
        self.items.append(message)
        self._open = message
        events.append(OutputItemEvent(type="response.output_item.added", sequence_number=next(self._sequence),
                                      output_index=self._index, item=message.model_copy(deep=True)))
        message.content.append(OutputText(text=""))
        events.append(ContentPartEvent(type="response.content_part.added", sequence_number=next(self._sequence),
                                       item_id=message.id, output_index=self._index, content_index=0,
                                       part=OutputText(text="")))
        return events

    def _close(self, status: ItemStatus) -> list[ResponseEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        events: list[ResponseEvent] = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            self._pending_logprobs = []
            events.append(TextDoneEvent(type="response.output_text.done", sequence_number=next(self._sequence),
                                        item_id=item.id, output_index=self._index, content_index=0, text=part.text,
                                        logprobs=list(part.logprobs)))
            events.append(ContentPartEvent(type="response.content_part.done", sequence_number=next(self._sequence),
                                           item_id=item.id, output_index=self._index, content_index=0,
                                           part=part.model_copy()))
        else:
            events.append(ArgumentsDoneEvent(type="response.function_call_arguments.done",
                                             sequence_number=next(self._sequence), item_id=item.id,
                                             output_index=self._index, name=item.name, arguments=item.arguments))
        item.status = status
        events.append(OutputItemEvent(type="response.output_item.done", sequence_number=next(self._sequence),
                                      output_index=self._index, item=item.model_copy(deep=True)))
        return events
