"""Every script of bench/ and tools/ starts the way its docstring says, `python bench/<name>.py` (or tools/), from
any directory.

Run from a temporary directory with PYTHONPATH unset, so only the script's own path set-up can make `bench` and
`tools` (never installed) and this checkout's `model` and `server` importable; `--help` imports everything the
script imports at the top.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(f"{p.parent.name}/{p.name}" for room in ("bench", "tools") for p in (ROOT / room).glob("*.py")
                 if not p.name.startswith("_") and p.name != "local_server.py")


def test_every_script_is_listed() -> None:
    assert {"bench/roofline.py", "bench/baseline.py", "bench/serve.py", "bench/run_all.py", "bench/peer.py",
            "tools/fuzz.py", "tools/soak.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_as_its_docstring_says(name: str, tmp_path: Path) -> None:
    assert f"python {name}" in (ROOT / name).read_text() or name == "bench/run_all.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(ROOT / name), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
