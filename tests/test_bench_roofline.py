"""The roofline's cost model against MODEL_SPEC's planning figures (no timing)."""

from __future__ import annotations

import pytest
import torch

from bench.roofline import decode_cost, serving_flops_per_output_token
from model import ModelConfig

SEED = ModelConfig()
ACTIVE_PARAMS = 403e6  # MODEL_SPEC: attention + shared + 2 routed experts per layer, x 30, plus lm_head


def test_batch_one_reads_and_computes_the_active_parameters() -> None:
    nbytes, flops = decode_cost(SEED, batch=1, context=0, dtype=torch.bfloat16)
    assert nbytes == pytest.approx(2 * ACTIVE_PARAMS, rel=0.01)
    assert flops == pytest.approx(2 * ACTIVE_PARAMS, rel=0.01)  # ~0.81 GFLOP per generated token


def test_a_large_batch_reads_every_weight_but_the_embedding_tables_once() -> None:
    nbytes, flops = decode_cost(SEED, batch=64, context=0, dtype=torch.bfloat16)
    embeddings = (SEED.vocab_size + SEED.max_position_embeddings) * SEED.hidden_size
    assert nbytes == pytest.approx(2 * (973_122_258 - embeddings), rel=0.01)
    assert flops == pytest.approx(64 * 2 * ACTIVE_PARAMS, rel=0.01)


def test_serving_counts_the_prompt_prefill_per_output_token() -> None:
    per_token = decode_cost(SEED, batch=1, context=96, dtype=torch.bfloat16)[1]
    head = 2 * SEED.vocab_size * SEED.hidden_size
    # 64 prompt tokens (no logits but the last) and 64 decoded tokens, per decoded token.
    assert serving_flops_per_output_token(SEED, 64, 64, torch.bfloat16) == pytest.approx(
        2 * per_token - head + head / 64)
