"""Every bench script starts the way its docstring says, `python bench/<name>.py`, from any directory.

Run from a temporary directory with PYTHONPATH unset, so only the script's own path set-up can make `bench`
(never installed) and this checkout's `model` and `server` importable; `--help` imports everything the script
imports at the top.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "local_server.py")


def test_every_script_is_listed() -> None:
    assert {"roofline.py", "baseline.py", "serve.py", "run_all.py", "peer.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_as_its_docstring_says(name: str, tmp_path: Path) -> None:
    assert f"python bench/{name}" in (BENCH / name).read_text() or name == "run_all.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(BENCH / name), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
