"""SamplingState: what the sampler keeps per sequence (its params, private generator, output token counts)."""

from collections.abc import Sequence

import torch

from server.engine.sampling_params import SamplingParams


class SamplingState:
    """Per-sequence sampler state: params, private generator, output token counts, prompt ids."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        # Seeded once here; lives with the sequence so preemption resumes the same stream.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.prompt_token_ids = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long)
        self.output_counts: dict[int, int] = {}

    def append_token(self, token_id: int) -> None:
        """Record a generated token for the frequency/presence/repetition penalties."""
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
