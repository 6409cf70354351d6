"""The CPU extension's loader: ISA detection, per-ISA build directories, the opt-out and the CLI's errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.ops import cpu_extension
from model.ops.extension.__main__ import main as extension_cli

ROOT = Path(__file__).resolve().parents[3]


def test_detected_isa_is_a_known_level() -> None:
    assert cpu_extension.detect_isa() in (*cpu_extension._ISA_FLAGS, None)


def test_each_isa_builds_in_its_own_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUSTOMLLM_EXTENSION_DIR", str(tmp_path))
    dirs = {cpu_extension.build_dir(isa) for isa in cpu_extension._ISA_FLAGS}
    assert len(dirs) == len(cpu_extension._ISA_FLAGS)
    assert all(d.parent == tmp_path for d in dirs)


def test_disabled_by_environment_falls_back_to_torch() -> None:
    code = ("import torch\nfrom model.ops import cpu_extension, mla_decode, registry\nassert not cpu_extension.load()\n"
            "print(registry.select(mla_decode.MLA_DECODE, registry.Target(torch.device('cpu'), torch.bfloat16))"
            ".backend.name)")
    env = {**os.environ, "CUSTOMLLM_CPU_EXTENSION": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "torch"


def test_cli_rejects_unknown_isa() -> None:
    with pytest.raises(SystemExit, match="unknown ISA level"):
        extension_cli(["build", "--isa", "avx9"])


AVX2 = {"avx2", "fma", "f16c"}
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}


def test_detection_never_picks_the_test_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: AVX2)
    assert cpu_extension.detect_isa() == "avx2"
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: AVX512_BF16)
    assert cpu_extension.detect_isa() == "avx512-bf16"
    assert "avx2-16lanes" in cpu_extension._ISA_FLAGS and "avx2-16lanes" not in cpu_extension.SERVING_ISAS


def test_forced_level(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: AVX2)
    for level in ("avx2-16lanes", "avx2"):
        monkeypatch.setenv("CUSTOMLLM_CPU_ISA", level)
        assert cpu_extension._chosen_isa() == level
    # A level this CPU cannot run, or no level at all: warned, naming what is missing, and the detected one.
    monkeypatch.setenv("CUSTOMLLM_CPU_ISA", "avx512-bf16")
    assert cpu_extension._chosen_isa() == "avx2"
    assert "CUSTOMLLM_CPU_ISA=avx512-bf16 needs CPU flags this CPU lacks (avx512_bf16, avx512bw" in caplog.text
    monkeypatch.setenv("CUSTOMLLM_CPU_ISA", "avx9")
    assert cpu_extension._chosen_isa() == "avx2"
    expected = "expected one of avx512-bf16, avx512, avx2, avx2-16lanes"
    assert f"CUSTOMLLM_CPU_ISA=avx9 is not a level ({expected})" in caplog.text
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: set())
    monkeypatch.setenv("CUSTOMLLM_CPU_ISA", "avx2")
    assert cpu_extension._chosen_isa() is None
    assert "using the detected level none (the torch paths)" in caplog.text


def test_cli_all_builds_the_serving_levels(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cpu_extension, "build", lambda isa: Path(isa))  # what would be built, not the compile
    extension_cli(["build", "--isa", "all"])
    assert capsys.readouterr().out.split() == ["avx512-bf16", "avx512", "avx2"]
    extension_cli(["build", "--isa", "avx2-16lanes"])
    assert capsys.readouterr().out.split() == ["avx2-16lanes"]


def test_build_all_loads_nothing_where_the_cpu_runs_every_level(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    # The image's builder stage on an AVX-512-BF16 CPU: every level is runnable, and loading a second level's ops
    # into one process aborts it (a duplicate registration). Building must compile and link, never load.
    from torch.utils import cpp_extension as torch_cpp_extension

    monkeypatch.setenv("CUSTOMLLM_EXTENSION_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: set().union(*cpu_extension._ISA_NEEDS.values()))
    loads: list[str] = []

    def compile_only(*, name: str, build_directory: str, **_: object) -> None:
        (Path(build_directory) / f"{name}.so").write_bytes(b"")

    def no_load(what: str) -> Callable[..., None]:
        return lambda *args, **kwargs: loads.append(what)

    monkeypatch.setattr(torch_cpp_extension, "_write_ninja_file_and_build_library", compile_only)
    monkeypatch.setattr(torch_cpp_extension, "load", no_load("cpp_extension.load"))
    monkeypatch.setattr(torch.ops, "load_library", no_load("torch.ops.load_library"))
    extension_cli(["build", "--isa", ",".join(cpu_extension._ISA_FLAGS)])
    assert loads == []
    assert all((cpu_extension.build_dir(isa) / "customllm_cpu.so").exists() for isa in cpu_extension._ISA_FLAGS)


def test_the_loaded_build_reports_its_vector_width() -> None:
    if not cpu_extension.load():
        pytest.skip("CPU extension unavailable on this machine")
    isa = cpu_extension.loaded_isa()
    assert isa in cpu_extension._ISA_FLAGS
    assert cpu_extension.vector_lanes() == (8 if isa == "avx2" else 16)
