"""The CPU extension's loader: ISA detection, per-ISA build directories, the opt-out and the CLI's errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.ops import cpu_extension

ROOT = Path(__file__).resolve().parents[3]


def test_detected_isa_is_a_known_level() -> None:
    assert cpu_extension.detect_isa() in (*cpu_extension._ISA_FLAGS, None)


def test_each_isa_builds_in_its_own_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUSTOMLLM_EXTENSION_DIR", str(tmp_path))
    dirs = {cpu_extension.build_dir(isa) for isa in cpu_extension._ISA_FLAGS}
    assert len(dirs) == len(cpu_extension._ISA_FLAGS)
    assert all(d.parent == tmp_path for d in dirs)


def test_disabled_by_environment_falls_back_to_torch() -> None:
    code = ("import torch\nfrom model.ops import cpu_extension, mla_decode\nassert not cpu_extension.load()\n"
            "print(mla_decode.select_mla_decode(torch.device('cpu'), torch.bfloat16).name)")
    env = {**os.environ, "CUSTOMLLM_CPU_EXTENSION": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "torch"


def test_cli_rejects_unknown_isa() -> None:
    with pytest.raises(SystemExit, match="unknown ISA level"):
        cpu_extension.main(["build", "--isa", "avx9"])
