"""Fixtures of the image tests: the engine, the images built once per session, a tiny checkpoint others can read.

Where containers cannot run (no podman as root, no docker daemon) every test here skips with the reason;
with CUSTOMLLM_REQUIRE_CONTAINERS=1 (set by .ci/run) the same reason fails them instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.image.engine import PROMETHEUS_IMAGE, ROOT, SERVER_IMAGE, Engine, find_engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    found = find_engine()
    if isinstance(found, Engine):
        return found
    if os.environ.get("CUSTOMLLM_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"containers are required here (CUSTOMLLM_REQUIRE_CONTAINERS=1) but cannot run: {found}")
    pytest.skip(f"containers cannot run here: {found}")


@pytest.fixture(scope="session")
def server_image(engine: Engine) -> str:
    engine.build(SERVER_IMAGE, ROOT)
    return SERVER_IMAGE


@pytest.fixture(scope="session")
def prometheus_image(engine: Engine) -> str:
    engine.build(PROMETHEUS_IMAGE, ROOT / "docker" / "prometheus-image")
    return PROMETHEUS_IMAGE


@pytest.fixture(scope="session")
def models_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny checkpoint as `tiny/`, readable by the image's user (uid 10001).

    pytest's temporary directories are private (0700), so the mount source gets its own permissions.
    """
    models = tmp_path_factory.mktemp("models")
    tiny = models / "tiny"
    shutil.copytree(tiny_checkpoint, tiny)
    for path in (models, tiny, *tiny.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return models
