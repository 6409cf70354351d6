"""Constrained decoding on llguidance: grammar compilation (cached, off the engine thread, time-limited), one
matcher per sample, and the per-step token bitmask of the constrained rows.

Shapes: C constrained rows, V vocabulary (logits width), W = ceil(V / 32) mask words; bit t % 32 of word t // 32
of a row is 1 when token t is allowed.

Threading: compilation runs on worker threads (asyncio.to_thread), never on the engine thread. A matcher belongs
to one sequence; only the engine thread touches it after `new_matcher()` (the sampler reads its mask, the
sampling state feeds it the sampled token).

NOTE: llguidance over xgrammar (both tried on a 3-field JSON schema with this tokenizer, CPU): llguidance reads
tokenizer.json as it is and has no dependencies, where xgrammar needs transformers, triton and tvm-ffi and a
hand-built vocabulary list (its default JSON separators ", "/": " rejected our compact tokens until configured);
llguidance reports a bad grammar as a matcher state with a message, not a C++ exception. xgrammar's masks are
faster once compiled (0.02 ms vs 0.4 ms per row per step, measured there); bench/grammar_mask.py measures ours
at the batch sizes that matter.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import threading
import time

import llguidance
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_BIT_POSITIONS = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)  # [32]


class GrammarError(ValueError):
    """A grammar that cannot be used (invalid, unsupported or too slow to compile); `field` is the request field
    it came in."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to: kind json (a JSON schema), regex, choice (a JSON list of strings) or grammar (Lark, or
    GBNF/EBNF converted to Lark)."""

    kind: str
    source: str


class CompiledGrammar:
    """A validated grammar; each sample gets its own matcher from it."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self._template = template
        self._lock = threading.Lock()

    def new_matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar (cheap: a copy, not a compile)."""
        with self._lock:
            return self._template.deep_copy()


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for a spec; raises ValueError for text that is not even well formed."""
    if spec.kind == "json":
        # Compact JSON: no whitespace between tokens, so a model cannot pad with spaces until max_tokens.
        return llguidance.LLMatcher.grammar_from_json_schema(
            spec.source, defaults={"item_separator": ",", "key_separator": ":", "whitespace_flexible": False})
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        choices = json.loads(spec.source)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "grammar":
        return llguidance.grammar_from("grammar", spec.source)
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


class GrammarCompiler:
    """Compiles specs into CompiledGrammars, with an LRU cache (failures are cached too) and a time limit.

    The llguidance tokenizer is built on first use (about 0.8 s for a 49k vocabulary), so a server that never
    sees a constrained request never pays for it.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int, cache_size: int = 256,
                 timeout_s: float = 10.0) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos_token_id = eos_token_id
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._cache: collections.OrderedDict[GrammarSpec, CompiledGrammar | str] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_size = cache_size
        self.timeout_s = timeout_s

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                start = time.perf_counter()
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self._vocab_size,
                                                         eos_token=self._eos_token_id)
                logger.info("grammar backend: llguidance %s, tokenizer built in %.2f s",
                            llguidance.get_version() if hasattr(llguidance, "get_version") else "?",
                            time.perf_counter() - start)
            return self._tokenizer

    def compile(self, spec: GrammarSpec, field: str) -> CompiledGrammar:
        """Blocking: the compiled grammar, from the cache when seen before; GrammarError naming `field`."""
        with self._cache_lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            hit = self._compile_uncached(spec)
            with self._cache_lock:
                self._cache[spec] = hit
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):
            raise GrammarError(field, f"{field} cannot be used: {hit}")
        return hit

    def _compile_uncached(self, spec: GrammarSpec) -> CompiledGrammar | str:
        try:
            text = grammar_text(spec)
        except ValueError as exc:
            return str(exc)
        tokenizer = self.tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            return messages[0]
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            return matcher.get_error()
        return CompiledGrammar(matcher)

    async def compile_async(self, spec: GrammarSpec, field: str) -> CompiledGrammar:
        """compile() on a worker thread, given up after timeout_s (the thread is bounded by llguidance's fuel
        limits, so it ends soon after)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.compile, spec, field), self.timeout_s)
        except TimeoutError:
            raise GrammarError(field, f"{field} took longer than {self.timeout_s:g} s to compile; "
                                      "simplify it") from None


class BitmaskFiller:
    """Fills the token bitmask [C, W] of the constrained rows of a step, in parallel over rows."""

    def __init__(self, num_threads: int | None = None) -> None:
        self._executor = llguidance.LLExecutor(num_threads)

    def fill(self, matchers: list[llguidance.LLMatcher], vocab_size: int) -> Tensor:
        """The allowed-token bitmask [C, W] (int32, CPU) of each matcher's next step."""
        num_words = (vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), num_words), -1, dtype=torch.int32)
        # NOTE: llguidance.torch wraps this call, but importing it runs a torch.compile decorator; the executor
        # writes the rows straight into the tensor's memory instead.
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               num_words * 4, len(matchers))
        return bitmask


def apply_bitmask_(logits: Tensor, bitmask: Tensor) -> None:
    """Set the disallowed tokens of logits [C, V] to -inf in place, given the bitmask [C, W]."""
    num_rows, vocab = logits.shape
    bits = bitmask.to(logits.device)[:, :, None] & _BIT_POSITIONS.to(logits.device)  # [C, W, 32]
    allowed = (bits != 0).reshape(num_rows, -1)[:, :vocab]  # [C, V]
    logits.masked_fill_(~allowed, -float("inf"))
