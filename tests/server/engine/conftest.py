"""Fixtures of the engine tests."""

import pytest

from server.engine.engine import Engine
from tests.server.engine_utils import make_engine


@pytest.fixture
def engine():
    """engine(**make_engine kwargs) starts a tiny engine; each is shut down after the test, with every cache block
    free again."""
    engines: list[Engine] = []

    def start(**kwargs) -> Engine:
        e = make_engine(**kwargs)
        e.start()
        engines.append(e)
        return e

    yield start
    for e in engines:
        e.shutdown()
        assert e.scheduler.block_manager.num_free_blocks == e.scheduler.block_manager.num_total_blocks
