"""Per-token routed experts of a sequence that asked for them (SGLang's `return_routed_experts`).

Shapes: t tokens, L decoder layers, K routed experts per token. A row is one token's top-k routed expert ids in
every layer, [L, K] int32, recorded when the model reads the token: the prompt's tokens, then each generated token
but the last. Rows travel to the request's stream with the output that carries the token they produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the scheduler imports Sequence, which imports this module
    from server.engine.scheduler import ScheduledSequence


class RoutedExpertsRecord:
    """The rows of one sequence: how many positions have one, and those not yet handed to an output.

    NOTE: one row per position, the first computed: a preempted sequence recomputes its tokens (and prefix-cache
    hits are skipped until the prompt's rows are recorded), so rows of positions already recorded are dropped.
    """

    __slots__ = ("_pending", "num_rows")

    def __init__(self) -> None:
        self.num_rows = 0  # positions 0..num_rows-1 have their row
        self._pending: list[np.ndarray] = []  # [t, L, K] pieces in position order

    def add(self, start_pos: int, rows: np.ndarray) -> None:
        """The rows [t, L, K] of positions start_pos.. that a step computed."""
        assert start_pos <= self.num_rows, (
            f"rows from position {start_pos} leave positions {self.num_rows}..{start_pos - 1} without one")
        new = rows[self.num_rows - start_pos:]
        if len(new):
            self._pending.append(new)
            self.num_rows += len(new)

    def take(self) -> list[np.ndarray] | None:
        """The rows recorded since the last take, as pieces [t, L, K] in position order; None when there are none."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        return pending


def record_step(scheduled: list[ScheduledSequence], rows: list[np.ndarray | None]) -> None:
    """Hand a step's rows to the sequences' records: per scheduled sequence, in order, [num_new_tokens, L, K] in
    position order (None where it did not ask). NOTE: a step that keeps fewer of a sequence's tokens than it ran
    (rejected draft tokens) cuts that sequence's rows to the kept ones first."""
    for s, seq_rows in zip(scheduled, rows, strict=True):
        record = s.seq.routed_experts
        if seq_rows is not None and record is not None:
            record.add(s.start_pos, seq_rows)
