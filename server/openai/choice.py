"""One choice of a response: token ids in, text deltas out, with stop strings, logprobs, token counts and the
routed experts."""

from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np

from server.engine.outputs import SequenceOutput
from server.engine.sampler_state import PromptLogprob
from server.openai.protocol import FinishReason, RoutedExperts
from server.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


@dataclasses.dataclass
class TokenLogprob:
    """One generated token's logprob entry: its id, logprob and the top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    text_offset: int  # characters of text before this token (the tokens' own text, whatever is held back)


class ChoiceBuilder:
    """Accumulates one sample's outputs. `finish_reason` is set once the choice is complete."""

    def __init__(self, index: int, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool, skip_special_tokens: bool, stop_token_ids: tuple[int, ...],
                 text_offset_base: int = 0, min_tokens: int = 0) -> None:
        self.index = index
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self._matcher = StopStringMatcher(stop, include_stop_str_in_output)
        self._include_stop = include_stop_str_in_output
        self._stop_token_ids = stop_token_ids
        self._offset_base = text_offset_base
        self._min_tokens = min_tokens
        self._num_prompt_tokens = len(prompt_token_ids)
        self.text = ""
        self.token_ids: list[int] = []  # every token counted in usage, the one that ended the sample too
        self._token_ids_sent = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None  # the stop string or stop token id that ended it
        self.prompt_logprobs: list[PromptLogprob | None] | None = None  # with the first output, if asked for
        self.prompt_sent = False  # streaming: whether a chunk has carried the prompt part yet
        self._routed: list[np.ndarray] = []  # routed-experts rows [t, L, K] in token order, if asked for
        self._num_routed_rows = 0
        self._routed_sent = 0  # streaming: pieces of _routed that a chunk has carried

    @property
    def prompt_pending(self) -> bool:
        """Whether the prompt logprobs have arrived and no chunk has carried them yet."""
        return self.prompt_logprobs is not None and not self.prompt_sent

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def unsent_token_ids(self) -> list[int]:
        """Streaming: the token ids no chunk has carried yet, now counted as sent."""
        ids = self.token_ids[self._token_ids_sent:]
        self._token_ids_sent = len(self.token_ids)
        return ids

    def routed_experts(self) -> RoutedExperts | None:
        """The rows [T, L, K] of every token the model read for this choice (None if not asked for)."""
        return RoutedExperts.of(np.concatenate(self._routed)) if self._routed else None

    @property
    def routed_pending(self) -> bool:
        """Streaming: whether rows have arrived that no chunk has carried yet."""
        return self._routed_sent < len(self._routed)

    def unsent_routed_experts(self) -> RoutedExperts | None:
        """Streaming: the rows no chunk has carried yet, now counted as sent (None if there are none)."""
        pieces = self._routed[self._routed_sent:]
        self._routed_sent = len(self._routed)
        return RoutedExperts.of(np.concatenate(pieces)) if pieces else None

    @property
    def stopped_by_string(self) -> bool:
        return self._matcher.stopped

    def add(self, out: SequenceOutput) -> str:
        """Consume the engine's new tokens; return the text they finalise (after stop-string hold-back)."""
        if self.finish_reason is not None:
            return ""  # tokens the engine made before it saw our stop-string abort
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        emitted: list[str] = []
        for i, token_id in enumerate(out.token_ids):
            self.token_ids.append(token_id)
            if out.logprobs is not None and out.top_logprobs is not None:
                # The detokenized length, not the emitted one: stop-string hold-back must not shift offsets.
                self.logprobs.append(TokenLogprob(token_id, out.logprobs[i], out.top_logprobs[i],
                                                  self._offset_base + self._detokenizer.output_len))
            if out.finish_reason == "stop" and i == len(out.token_ids) - 1 and not self._include_stop:
                break  # the EOS or stop_token_ids token that ended the sample: counted, but not text (as vLLM)
            # As vLLM: no stop string ends a sample before min_tokens tokens; one that ends later may start earlier.
            text, stopped = self._matcher.add(self._detokenizer.add(token_id),
                                              may_stop=self.num_tokens >= self._min_tokens)
            emitted.append(text)
            if stopped:
                self.finish_reason, self.stop_reason = "stop", self._matcher.stop_str
                return self._emit("".join(emitted), out)
        if out.finish_reason is not None:
            text, stopped = self._matcher.add(self._detokenizer.flush())
            emitted.append(text)
            if stopped:
                self.finish_reason, self.stop_reason = "stop", self._matcher.stop_str
            else:
                emitted.append(self._matcher.flush())
                self.finish_reason = cast(FinishReason, out.finish_reason)
                last = out.token_ids[-1] if out.token_ids else None
                if out.finish_reason == "stop" and last in self._stop_token_ids:
                    self.stop_reason = last
        return self._emit("".join(emitted), out)

    def _emit(self, text: str, out: SequenceOutput) -> str:
        self.text += text
        # Rows of the tokens the model read for the tokens kept: the prompt's, then each kept token's but the last (a
        # stop string may end the choice before the output's last token).
        keep = self._num_prompt_tokens + max(self.num_tokens - 1, 0) - self._num_routed_rows
        for piece in out.routed_experts or []:
            rows = piece[:keep]
            if len(rows):
                self._routed.append(rows)
                self._num_routed_rows += len(rows)
                keep -= len(rows)
        return text
