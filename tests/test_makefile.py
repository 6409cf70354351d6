"""The Makefile's choice of interpreter for .venv: any Python >= 3.11 on PATH, and a clear error otherwise.

Each case runs the real `make` on the real Makefile with PATH reduced to a temporary folder, so only the
interpreters placed there can be found. An "old" interpreter is a shell script that answers like Python 3.10
(this machine has no real one); the new ones are links to the interpreter running the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
REAL_PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _old_python(path: Path) -> None:
    # Exits 1 on the Makefile's version check (sys.version_info < (3, 11)) as a real 3.10 would.
    path.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.10.14"; exit 0; fi\nexit 1\n')
    path.chmod(0o755)


def _make(bin_dir: Path, venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    return subprocess.run([MAKE, "-C", str(ROOT), "install", f"VENV={venv}", *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/")})


def test_takes_a_plain_python3_of_3_11_or_newer(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(REAL_PYTHON)
    result = _make(bin_dir, tmp_path / "venv", "-n")  # -n: print the recipe, build nothing
    assert result.returncode == 0, result.stderr
    assert f'"{bin_dir / "python3"}" -m venv {tmp_path / "venv"}' in result.stdout


def test_skips_an_old_python3_for_a_newer_versioned_name(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _old_python(bin_dir / "python3")
    (bin_dir / "python3.12").symlink_to(REAL_PYTHON)
    result = _make(bin_dir, tmp_path / "venv", "-n")
    assert result.returncode == 0, result.stderr
    assert f'"{bin_dir / "python3.12"}" -m venv' in result.stdout
    assert f'"{bin_dir / "python3"}" -m venv' not in result.stdout


def test_says_which_python_is_too_old_and_builds_nothing(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _old_python(bin_dir / "python3")
    result = _make(bin_dir, tmp_path / "venv")
    assert result.returncode != 0
    assert "needs Python >= 3.11" in result.stderr
    assert "Python 3.10.14" in result.stderr  # the version it found, so the user knows what to upgrade
    assert not (tmp_path / "venv").exists()


def test_an_explicit_old_python_is_refused_too(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(REAL_PYTHON)
    _old_python(tmp_path / "python3.10")
    result = _make(bin_dir, tmp_path / "venv", f"PYTHON={tmp_path / 'python3.10'}")
    assert result.returncode != 0
    assert f"{tmp_path / 'python3.10'} is Python 3.10.14" in result.stderr
    assert not (tmp_path / "venv").exists()
