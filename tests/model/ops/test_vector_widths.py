"""The kernel-vs-oracle tests again at the other vector width than this CPU's own, so one run checks 8 and 16 lanes.

The width is compiled in (model/csrc/vec.h), and one process registers torch.ops.customllm once: a subprocess
forces the other level with CUSTOMLLM_CPU_ISA. On an AVX2 CPU that is avx2-16lanes (the AVX-512 builds' 16-lane
tiles, tails and panels in AVX2 instructions), on an AVX-512 CPU avx2 (8 lanes). The subprocess first proves the
level it loaded and its lanes (a silent fallback to the native build or the torch paths fails here), then runs the
tests. Its build is cached like any other (40-60 s once on 2 busy cores); the tests then take ~15 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.ops import cpu_extension

ROOT = Path(__file__).resolve().parents[3]
# The C++ kernels against their torch oracles, and the tiny model against its reference (cpp decode and MoE).
ORACLE_TESTS = ["tests/model/ops/test_linear_bf16.py", "tests/model/ops/test_mla_decode.py",
                "tests/model/ops/test_moe_experts.py", "tests/model/ops/test_rms_norm.py", "tests/model/test_model.py"]

# argv: level, lanes, pytest arguments. Exit 3 when another level (or none) loaded.
_PROBE = """
import sys

import pytest

from model.ops import cpu_extension

isa, lanes = cpu_extension.loaded_isa(), cpu_extension.vector_lanes()
print(f"loaded {isa} with {lanes} lanes", flush=True)
if (isa, lanes) != (sys.argv[1], int(sys.argv[2])) or not cpu_extension.load():
    sys.exit(3)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[3:]]))
"""


def _other_width() -> tuple[str, int]:
    return ("avx2-16lanes", 16) if cpu_extension.detect_isa() == "avx2" else ("avx2", 8)


@pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")
def test_oracle_tests_pass_at_the_other_vector_width() -> None:
    isa, lanes = _other_width()
    if not (cpu_extension.build_dir(isa) / "customllm_cpu.so").exists() and shutil.which(
            os.environ.get("CXX", "c++")) is None:
        pytest.skip(f"no {isa} build and no C++ compiler to make one")
    env = {**os.environ, "CUSTOMLLM_CPU_ISA": isa, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _PROBE, isa, str(lanes), *ORACLE_TESTS], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1500)
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert f"loaded {isa} with {lanes} lanes" in result.stdout, output
    assert result.returncode == 0, output
    assert " passed" in result.stdout.splitlines()[-1], output
