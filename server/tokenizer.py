"""Tokenizer loading, the chat template, streaming-safe detokenization and stop strings."""

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _BackendTokenizer
from tokenizers import decoders

_BUNDLED_NAME = "tokenizer.json"
_REPLACEMENT_CHAR = "\ufffd"
# Looked up by string so that a tokenizer given with --tokenizer can use its own ids.
_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_CHAT_END_TOKEN = "<|im_end|>"


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> "Tokenizer":
    """Load a tokenizer.json file, a directory holding one, or the bundled one when path is None."""
    if path is None:
        # importlib.resources also finds the file when the package is installed (or zipped).
        resource = resources.files(__package__ or "server").joinpath(_BUNDLED_NAME)
        source = f"bundled {_BUNDLED_NAME}"
        try:
            text = resource.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read the {source}: {err}") from err
        return Tokenizer(_parse(text, source), source)

    file = Path(path)
    if file.is_dir():
        file = file / _BUNDLED_NAME
    if not file.is_file():
        raise ValueError(
            f"tokenizer not found at {str(path)!r}: "
            f"expected a {_BUNDLED_NAME} file or a directory holding one"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read tokenizer file {str(file)!r}: {err}") from err
    return Tokenizer(_parse(text, repr(str(file))), str(file))


def _parse(text: str, source: str) -> _BackendTokenizer:
    try:
        return _BackendTokenizer.from_str(text)
    # tokenizers raises a bare Exception for malformed files; re-raise it as a ValueError.
    except Exception as err:
        raise ValueError(f"invalid tokenizer file {source}: {err}") from err


def _byte_level_char_to_byte() -> dict[str, int]:
    """Invert the byte-level BPE alphabet: one printable char stands for each of the 256 bytes."""
    # Printable, non-space Latin-1 bytes stand for themselves; the remaining 68 bytes are moved,
    # in byte order, to chars 256, 257, ... so that no token string holds whitespace or controls.
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in direct}
    moved = [b for b in range(256) if chr(b) not in table]
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the operations the server needs."""

    def __init__(self, backend: _BackendTokenizer, source: str) -> None:
        self._backend = backend
        self.source = source
        vocab = backend.get_vocab(with_added_tokens=True)
        # Ids run up to the largest one, even if some ids in between are unassigned.
        self.vocab_size: int = max(vocab.values()) + 1
        eos = next((vocab[t] for t in _EOS_TOKENS if t in vocab), None)
        if eos is None:
            raise ValueError(f"tokenizer {source} has no end-of-sequence token (looked for {_EOS_TOKENS})")
        self.eos_token_id: int = eos
        chat_end = vocab.get(_CHAT_END_TOKEN)
        self.chat_stop_token_ids: tuple[int, ...] = () if chat_end is None else (chat_end,)
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, tok in added.items() if tok.special)
        self._added_token_ids = frozenset(added)
        # The BOS the post-processor puts before a text (with add_special_tokens), if it adds one.
        plain = backend.encode("x", add_special_tokens=False).ids
        full = backend.encode("x", add_special_tokens=True).ids
        self.bos_token_id: int | None = full[0] if full[1:len(plain) + 1] == plain else None
        self._char_to_byte = (
            _byte_level_char_to_byte() if isinstance(backend.decoder, decoders.ByteLevel) else None
        )

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what the grammar backend reads)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; special-token strings such as <|im_start|> map to their ids. The server adds nothing
        to prompts; add_special_tokens (/tokenize's vLLM field) applies the tokenizer's post-processor (a BOS)."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the backend."""
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ids; raises ValueError for an id outside [0, vocab_size)."""
        if ids:
            low, high = min(ids), max(ids)
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (byte-level form, e.g. 'Ġthe'), or None if unassigned."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None."""
        return self._backend.token_to_id(token)

    def token_text(self, token_id: int) -> str:
        """Display string of one token for logprobs; may be U+FFFD when it holds part of a character."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (chat logprobs' `bytes`), even for part of a character."""
        token = self.id_to_token(token_id)
        if token is None or self._char_to_byte is None or token_id in self._added_token_ids:
            return self.token_text(token_id).encode("utf-8")
        return bytes(self._char_to_byte[c] for c in token)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render messages as ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n`) plus the reply header."""
        # NOTE: SmolLM2-Instruct injects a default system prompt when none is given; we do not,
        # because the served model is a pretraining model and the prompt should hold only what
        # the client sent. Special-token strings inside content encode as those tokens (as in vLLM).
        parts = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise TypeError(f"messages[{i}] needs a string 'role' and a string 'content'")
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the ChatML rendering of messages."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas that never end in a split character.

    The deltas (plus `flush()`) concatenate to `tokenizer.decode(generated_ids)`. Each step decodes
    only a short window: `_ids[_prefix_offset:_read_offset]` is text already emitted (kept as
    context), `_ids[_read_offset:]` is not emitted yet. A window whose text ends in U+FFFD may
    hold part of a multi-byte character, so it is held until a later token completes it.
    """

    # Prompt ids decoded ahead of the first generated token. Byte-level BPE does not need them,
    # but SentencePiece-style decoders drop a leading space at the start of a decode.
    _NUM_CONTEXT_IDS = 4

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-self._NUM_CONTEXT_IDS :]) if prompt_token_ids else []
        # A prompt ending mid-character would glue its bytes to the first generated token, and
        # the output must be the text of the generated ids alone; such context is dropped.
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.output_len = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated id and return the text it finalizes (often '' while a character is split)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        return self._advance(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Return whatever is still held back (a trailing U+FFFD is final once the sequence ends)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        return self._advance(new_text[len(prefix_text) :])

    def _advance(self, delta: str) -> str:
        # The emitted window becomes the next context; older ids are no longer needed.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.output_len += len(delta)
        return delta


class StopStringMatcher:
    """Cuts streamed text at the first stop string, holding back only text that may start one.

    Of several matches the one that ends first wins (a longer one on a tie), so the result does not
    depend on how the text was split into deltas. Held-back text is at most max(len(stop)) - 1 chars.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(dict.fromkeys(stop))  # drop duplicates, keep order
        self._include = include_stop_str_in_output
        self._first_chars = frozenset(s[0] for s in self._stop)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.stop_str: str | None = None  # the stop string that matched
        self.output_len = 0  # characters emitted so far; once stopped, where the output ends

    def add(self, delta: str, may_stop: bool = True) -> tuple[str, bool]:
        """Consume a text delta; return (text to emit now, whether a stop string was found).

        With may_stop False (before min_tokens) complete stop strings are emitted as text; only a suffix that may
        begin one is still held back, so a stop string ending after min_tokens still matches.
        """
        if self.stopped:
            return "", True
        text = self._pending + delta
        match = self._find(text) if may_stop else None
        if match is not None:
            start, stop_str = match
            self.stopped, self.stop_str, self._pending = True, stop_str, ""
            return self._emit(text[: start + len(stop_str) if self._include else start]), True
        hold = self._hold_len(text)
        self._pending = text[len(text) - hold :]
        return self._emit(text[: len(text) - hold]), False

    def flush(self) -> str:
        """Release held-back text at the end of the sequence ('' once stopped)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else self._emit(text)

    def _emit(self, text: str) -> str:
        self.output_len += len(text)
        return text

    def _find(self, text: str) -> tuple[int, str] | None:
        # NOTE: no match can start in already emitted text: its start would have been held back.
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        return None if best is None else (best[1], best[2])

    def _hold_len(self, text: str) -> int:
        # Longest suffix of text that is the beginning of some stop string.
        for k in range(min(len(text), self._max_hold), 0, -1):
            if text[-k] in self._first_chars:
                suffix = text[-k:]
                if any(s.startswith(suffix) for s in self._stop):
                    return k
        return 0
