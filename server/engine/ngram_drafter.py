"""Prompt-lookup drafts: each decoding sequence proposes the tokens that followed its last n tokens the latest time
they appeared in its prompt or output (vLLM's "ngram" method), from an index grown with the sequence.

Cost: each token is indexed once, as the end of one n-gram per n in [prompt_lookup_min, prompt_lookup_max] (a
prompt of 2,048 tokens once, about 10k dict inserts at the defaults); a proposal is one dict lookup per n. Nothing
scans the history per step.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens

from server.engine.sequence import Sequence
from server.engine.speculative_config import SpeculativeConfig


class NgramIndex:
    """One sequence's n-grams: for each n, n-gram -> the position right after its latest occurrence that has a token
    after it (the sequence's own last n tokens never match themselves)."""

    __slots__ = ("_latest", "_num_indexed", "max_n", "min_n")

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._latest: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]  # by n; [0, min_n) unused
        self._num_indexed = 1  # positions p < this have their n-grams tokens[p - n:p] registered

    def _catch_up(self, tokens: Tokens[int]) -> None:
        # Position p gets registered once the token at p exists: p < len(tokens). Tokens only ever grow (rejected
        # drafts never enter a sequence's tokens), so what is registered stays true.
        for p in range(self._num_indexed, len(tokens)):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self._latest[n][tuple(tokens[p - n:p])] = p
        self._num_indexed = max(self._num_indexed, len(tokens))

    def propose(self, tokens: Tokens[int], num_tokens: int) -> list[int]:
        """Up to num_tokens draft tokens continuing `tokens`, the longest matching n first; [] without a match."""
        self._catch_up(tokens)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = self._latest[n].get(tuple(tokens[length - n:]))
            if start is None:
                continue
            # Copy forward from the match; a match `period` tokens back whose continuation runs into the present
            # keeps repeating with that period (a repeated token drafts itself num_tokens times).
            period = length - start
            draft: list[int] = []
            for j in range(num_tokens):
                draft.append(tokens[start + j] if start + j < length else draft[j - period])
            return draft
        return []


class NgramDrafter:
    """Sets `spec_token_ids` of each decoding sequence before the scheduler budgets the step."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, running: list[Sequence]) -> None:
        """Drafts for every running sequence whose next step is a decode; none when the batch is too large."""
        cfg = self.config
        enabled = cfg.disable_by_batch_size is None or len(running) < cfg.disable_by_batch_size
        for seq in running:
            seq.spec_token_ids = self._draft(seq) if enabled and not seq.is_prefill else []

    def _draft(self, seq: Sequence) -> list[int]:
        # A step returns at most 1 + len(draft) tokens: never more than max_tokens allows, nor past max_model_len.
        room = min(self.config.num_speculative_tokens, seq.max_tokens - seq.num_generated_tokens - 1,
                   self.max_model_len - seq.num_tokens)
        if room <= 0:
            return []
        if seq.ngram_index is None:
            seq.ngram_index = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        draft = seq.ngram_index.propose(seq.token_ids, room)
        matcher = seq.sampling.matcher
        if draft and matcher is not None:
            # The grammar cuts a draft at its first token it would not allow (checked without advancing it).
            draft = draft[:matcher.validate_tokens(draft)]
        return draft
