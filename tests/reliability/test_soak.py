"""A short soak (tools/soak.py's run_soak) against an in-process tiny server, with all of the soak's checks."""

from __future__ import annotations

import os
from pathlib import Path

from tests.server.live import live_server
from tools.soak import SoakConfig, run_soak

DURATION = 35.0


def test_short_soak(tiny_checkpoint: Path) -> None:
    # The server runs in this process, so this process's resident memory is the server's.
    cfg = SoakConfig(duration=DURATION, concurrency=16, seed=0, warmup=10.0, memory_pid=os.getpid(), max_replays=24)
    with live_server(tiny_checkpoint, max_num_seqs=32) as server:
        report = run_soak(server.base_url, cfg)
        server.engine.scheduler.block_manager.check_invariants()
    print(report.summary())
    assert not report.problems(), report.summary()
    # The traffic was the mix it claims to be.
    assert report.completed >= 50 and report.cancelled >= 5, report.summary()
    assert report.streamed and report.seeded and report.with_stop
    assert report.replayed >= 10
    assert report.rss_warm_kb > 0 and report.memory_growth < 0.05
