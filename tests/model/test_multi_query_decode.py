"""Decode rows with several queries per sequence (speculative decoding's 1 + k tokens): causal among themselves,
on every decode backend, equal to the reference at every position."""

import random

import pytest
import torch

from model import AttentionMetadata
from model.ops import cpu_extension
from tests.model.conftest import TINY, random_model, random_state
from tests.model.reference import reference_logits
from tests.model.test_model import BLOCK, PagedRunner


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_multi_query_decode_rows_match_the_reference_at_every_position(backend: str) -> None:
    if backend == "cpp" and not cpu_extension.load():
        pytest.skip("CPU extension unavailable on this machine")
    model = random_model(TINY, 1, attention=backend)
    state = random_state(TINY, 1)
    runner = PagedRunner(model)
    gen = random.Random(5)
    # Contexts that end inside a block, on a block boundary and one token before one.
    prompts = {s: [gen.randrange(TINY.vocab_size) for _ in range(n)] for s, n in enumerate([6, 8, 11, 7])}
    for s in range(3):
        runner.step([(s, prompts[s])])
    # One step: a prefill of 7 (sequence 3; a chunk of up to 5 would join the decode rows, which is also correct),
    # then decodes of 1, 3 and 5 new tokens (the last token plus drafts).
    new = {3: prompts[3], 0: [gen.randrange(TINY.vocab_size)], 1: [gen.randrange(TINY.vocab_size) for _ in range(3)],
           2: [gen.randrange(TINY.vocab_size) for _ in range(5)]}
    ids, positions, q_lens, ctx_lens, tables = [], [], [], [], []
    for s, tokens in new.items():
        start = len(prompts[s]) if s != 3 else 0
        end = start + len(tokens)
        table = runner.tables.setdefault(s, [])
        while len(table) * BLOCK < end:
            table.append(runner.free.pop())
        ids += tokens
        positions += range(start, end)
        q_lens.append(len(tokens))
        ctx_lens.append(end)
        tables.append(table)
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, BLOCK, max_decode_query_len=5)
    assert meta.num_prefill_tokens == 7 and meta.decode_block_tables.shape[0] == 9  # one decode row per token
    logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), meta, runner.cache.layers))
    row = 0
    for s, tokens in new.items():
        full = (prompts[s] if s != 3 else []) + tokens
        ref = reference_logits(state, TINY, full)[-len(tokens):]  # [Q, V]: each new token given those before it
        torch.testing.assert_close(logits[row:row + len(tokens)], ref, atol=1e-4, rtol=1e-4)
        row += len(tokens)
