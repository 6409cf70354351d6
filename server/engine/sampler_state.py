"""SamplingState: what the sampler keeps per sequence (its params, private generator, output token counts)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PromptLogprob:
    """One prompt token's logprob given the tokens before it, its rank (1 = most likely) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class SamplingState:
    """Per-sequence sampler state: params, private generator, output token counts, prompt ids."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
        matcher: LLMatcher | None = None,
    ) -> None:
        self.params = params
        # The grammar this sample is constrained to (server/engine/grammar.py), advanced by every token.
        self.matcher = matcher
        # Seeded once here; lives with the sequence so preemption resumes the same stream.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.prompt_token_ids = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long)
        self.output_counts: dict[int, int] = {}
        # Entry i: prompt token i given tokens < i (None for token 0, which has no context), filled by the model
        # runner as the prompt's chunks run; None when the request did not ask for prompt logprobs.
        self.prompt_logprobs: list[PromptLogprob | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None)

    def append_token(self, token_id: int) -> None:
        """Record a generated token for the penalties and advance the grammar, if any."""
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if self.matcher is not None and not self.matcher.consume_token(token_id):
            # Cannot happen for a token the mask allowed; the matcher stays in its error state, whose mask
            # allows only EOS, so the sample still ends.
            logger.warning("grammar rejected sampled token %d: %s", token_id, self.matcher.get_error())
