"""The CPU extension (model/csrc/*.cpp): built with torch's cpp_extension for this CPU's instruction set, once.

Prebuild: python -m model.ops.extension build [--isa avx2,avx512,avx512-bf16 | --isa all] (model/ops/extension/).

`load()` returns True once the ops are registered under `torch.ops.customllm`, False (logged) when this CPU
lacks AVX2/FMA, no compiler is there or the build fails: the registry then passes over every backend that needs
it (model/ops/registry.py).

Builds are cached per ISA level, torch version and source hash under $CUSTOMLLM_EXTENSION_DIR (default
~/.cache/customllm/extension). A cached build is loaded without a compiler; a missing one is JIT-built
(g++ and ninja needed, ~30 s). NOTE on images: the Docker builder prebuilds with `--isa all`, so an image built
on one CPU carries a build for every level and a CPU of another level loads its own (an AVX2 build never runs
AVX-512 code, and an AVX-512 CPU does not settle for the AVX2 build). A CPU below AVX2 gets the torch paths.

Environment:
- CUSTOMLLM_CPU_EXTENSION=0: do not load the extension (the torch paths everywhere).
- CUSTOMLLM_EXTENSION_DIR: where builds are cached (above).
- CUSTOMLLM_CPU_ISA=<level>: load this level instead of the detected one (an A/B of avx2 against avx512 on an
  AVX-512 CPU; avx2-16lanes for the tests). A level this CPU cannot run is a logged warning naming the CPU flags
  it lacks (an unknown name one listing the levels), and the detected level loads instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_NAME = "customllm_cpu"

# ISA level -> compiler flags. Vector width comes from the flags (model/csrc/vec.h).
_ISA_FLAGS: dict[str, list[str]] = {
    "avx512-bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    # Test only: the AVX-512 builds' 16-lane kernel logic (tiles, tails, panels) in pairs of AVX2 instructions,
    # so an AVX2 CPU checks it against the torch oracle. Slower than avx2: only ever loaded when forced.
    "avx2-16lanes": ["-mavx2", "-mfma", "-mf16c", "-DCUSTOMLLM_LANES=16"],
}
# /proc/cpuinfo flags each level needs.
_ISA_NEEDS: dict[str, set[str]] = {
    "avx512-bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    "avx2": {"avx2", "fma", "f16c"},
    "avx2-16lanes": {"avx2", "fma", "f16c"},
}
ISA_LEVELS = tuple(_ISA_FLAGS)  # every level `build` knows, the test level included
# The levels a CPU is served with, best first: detect_isa() picks one, `build --isa all` builds them all.
SERVING_ISAS = ("avx512-bf16", "avx512", "avx2")
# -ffast-math lets the compiler reorder float sums (the kernels avoid infinities, see kNoScore). Loops start on
# a 64-byte line: the GEMM's inner loop (144 bytes on AVX2) then always spans 3 lines, not 3 or 4 depending on
# where unrelated code moved it, which changed the batch-64 GEMMs by ~15% (Zen 3) between identical kernels.
_COMMON_FLAGS = ["-O3", "-fopenmp", "-ffast-math", "-falign-loops=64", "-DNDEBUG", "-Wno-unused-function"]


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_isa() -> str | None:
    """The best ISA level this CPU runs, or None below AVX2/FMA (or off x86 Linux)."""
    flags = cpu_flags()
    return next((isa for isa in SERVING_ISAS if _ISA_NEEDS[isa] <= flags), None)


def _chosen_isa() -> str | None:
    """detect_isa(), or the level CUSTOMLLM_CPU_ISA forces where this CPU runs it (else a warning and the former)."""
    forced, detected = os.environ.get("CUSTOMLLM_CPU_ISA", ""), detect_isa()
    if not forced:
        return detected
    instead = detected or "none (the torch paths)"
    if forced not in _ISA_FLAGS:
        logger.warning("CUSTOMLLM_CPU_ISA=%s is not a level (expected one of %s); using the detected level %s",
                       forced, ", ".join(_ISA_FLAGS), instead)
        return detected
    lacking = _ISA_NEEDS[forced] - cpu_flags()
    if lacking:
        logger.warning("CUSTOMLLM_CPU_ISA=%s needs CPU flags this CPU lacks (%s); using the detected level %s",
                       forced, ", ".join(sorted(lacking)), instead)
        return detected
    logger.info("CPU extension level %s forced by CUSTOMLLM_CPU_ISA (detected: %s)", forced, instead)
    return forced


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.cpp"))


def build_dir(isa: str) -> Path:
    """Where the build for this ISA level, torch version and source text lives."""
    digest = hashlib.sha256()
    for path in sorted(_CSRC.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(_ISA_FLAGS[isa] + _COMMON_FLAGS).encode())
    root = Path(os.environ.get("CUSTOMLLM_EXTENSION_DIR", Path.home() / ".cache" / "customllm" / "extension"))
    return root / f"torch{torch.__version__}-{isa}-{digest.hexdigest()[:12]}"


def build(isa: str) -> Path:
    """Compile the extension for `isa` (no need for this CPU to run it) and return the shared library."""
    directory = build_dir(isa)
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{_NAME}.so"
    if not library.exists():
        start = time.perf_counter()
        args: dict[str, Any] = dict(name=_NAME, sources=[str(s) for s in _sources()],
                                    build_directory=str(directory), extra_cflags=_COMMON_FLAGS + _ISA_FLAGS[isa],
                                    extra_ldflags=["-fopenmp"], verbose=False)
        # Compile and link only, never load: a build for instructions this CPU lacks dies with SIGILL in its
        # static initialisers, and a second level loaded into this process aborts registering the same ops
        # (`build --isa all` on an AVX-512 CPU). torch's private step, torch pinned; load() loads one level.
        cpp_extension._write_ninja_file_and_build_library(
            **args, extra_cuda_cflags=[], extra_sycl_cflags=[], extra_include_paths=[], with_cuda=False,
            with_sycl=False)
        logger.info("built the CPU extension for %s in %.1f s: %s", isa, time.perf_counter() - start, library)
    return library


def load() -> bool:
    """Register torch.ops.customllm.* for this CPU (building it if needed); False, logged, when not possible."""
    return _load() is not None


def loaded_isa() -> str | None:
    """The ISA level whose build `load()` registered, or None (the torch paths)."""
    loaded = _load()
    return None if loaded is None else loaded[0]


def vector_lanes() -> int | None:
    """The float lanes per vector of the loaded build (model/csrc/lanes.cpp), or None."""
    loaded = _load()
    return None if loaded is None else loaded[1]


@functools.cache
def _load() -> tuple[str, int] | None:
    """(level, lanes) of the build registered in this process (once), or None, logged."""
    if os.environ.get("CUSTOMLLM_CPU_EXTENSION", "1") == "0":
        logger.info("CPU extension disabled by CUSTOMLLM_CPU_EXTENSION=0; using the torch paths")
        return None
    isa = _chosen_isa()
    if isa is None:
        logger.info("CPU extension: this CPU lacks AVX2/FMA; using the torch paths")
        return None
    try:
        library = build_dir(isa) / f"{_NAME}.so"
        if not library.exists():
            library = build(isa)
        torch.ops.load_library(str(library))
        lanes = int(ctypes.CDLL(str(library)).customllm_vector_lanes())
    except (RuntimeError, OSError, ImportError, AttributeError) as exc:  # no compiler, failed build, unloadable
        logger.warning("CPU extension (%s) unavailable (%s); using the torch paths", isa, str(exc).splitlines()[0])
        return None
    logger.info("CPU extension loaded (%s, %d-lane vectors): %s", isa, lanes, library)
    return isa, lanes
