"""build_engine leaves the main thread without an OpenMP thread pool (the engine thread must own the only one)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: pytest's own main thread has long since run parallel torch ops.
_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch
    from model import ModelConfig
    from server.startup import build_engine

    def threads():
        return set(os.listdir("/proc/self/task"))

    config = ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         latent_dim=16, intermediate_size=128, max_position_embeddings=256)
    before = threads()
    # 8192 cache tokens x 2 layers x 48 values: zero-filling it is a parallel op.
    build_engine(None, dtype="float32", device="cpu", model_config=config, kv_cache_tokens="8192")
    deadline = time.monotonic() + 5  # the loader thread's pool workers exit just after it
    while threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    after_build = threads()
    x = torch.randn(512, 512)
    (x @ x).sum()  # a parallel op on this thread: libgomp starts a pool worker that stays
    after_main_op = threads()
    print(len(after_build - before), len(after_main_op - after_build))
""")


@pytest.mark.skipif(not Path("/proc/self/task").exists() or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and more than one torch thread")
def test_build_engine_starts_no_thread_pool_on_the_main_thread() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    left_by_build, left_by_main_op = map(int, result.stdout.split())
    assert left_by_build == 0, "build_engine left threads behind: it ran parallel torch work on the main thread"
    assert left_by_main_op >= 1, "control failed: a parallel op on the main thread should leave a pool worker"
