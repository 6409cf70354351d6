"""Prompt logprobs in the two shapes clients read: OpenAI's `echo` + `logprobs` (the prompt's tokens lead the
choice's legacy logprobs lists, the first with null) and vLLM's `prompt_logprobs` ({token id: entry} per token)."""

from __future__ import annotations

from collections.abc import Callable

from server.engine.sampler_state import PromptLogprob
from server.openai.protocol import CompletionLogprobs, PromptLogprobEntry
from server.tokenizer import IncrementalDetokenizer, Tokenizer


def top_dict(label: Callable[[int], str], token_id: int, logprob: float,
             top: list[tuple[int, float]]) -> dict[str, float]:
    """One position's `top_logprobs`, keyed by `label` (the token's text or id label): the k most likely tokens and
    always the chosen one (OpenAI: "up to logprobs+1 elements"; vLLM does the same)."""
    entries = {label(t): lp for t, lp in top}
    entries.setdefault(label(token_id), logprob)
    return entries


def prompt_text_offsets(tokenizer: Tokenizer, token_ids: list[int]) -> list[int]:
    """Characters of the echoed prompt text before each of its tokens."""
    detokenizer = IncrementalDetokenizer(tokenizer, (), skip_special_tokens=False)
    offsets = []
    for token_id in token_ids:
        offsets.append(detokenizer.output_len)
        detokenizer.add(token_id)
    return offsets


def echo_logprobs(tokenizer: Tokenizer, label: Callable[[int], str], token_ids: list[int],
                  entries: list[PromptLogprob | None], k: int) -> CompletionLogprobs:
    """The prompt's part of an echoed choice's logprobs: entry 0 (no context) is null, as OpenAI sends it."""
    top: list[dict[str, float] | None] = [
        None if e is None else top_dict(label, e.token_id, e.logprob, e.top[:k]) for e in entries]
    return CompletionLogprobs(tokens=[label(t) for t in token_ids],
                              token_logprobs=[None if e is None else e.logprob for e in entries],
                              top_logprobs=top, text_offset=prompt_text_offsets(tokenizer, token_ids))


def vllm_prompt_logprobs(tokenizer: Tokenizer, entries: list[PromptLogprob | None],
                         k: int) -> list[dict[str, PromptLogprobEntry] | None]:
    """vLLM's `prompt_logprobs`: per token null (the first) or the token itself and its k best alternatives."""
    out: list[dict[str, PromptLogprobEntry] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranked = {t: (lp, rank) for rank, (t, lp) in enumerate(e.top[:k], start=1)}
        ranked.setdefault(e.token_id, (e.logprob, e.rank))
        out.append({str(t): PromptLogprobEntry(logprob=lp, rank=rank, decoded_token=tokenizer.token_text(t))
                    for t, (lp, rank) in ranked.items()})
    return out
