"""GPU flags: --enforce-eager and --gpu-memory-utilization parse as vLLM's do; the GPU cache sizing arithmetic."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.startup import _GPU_ACTIVATION_RESERVE, gpu_cache_bytes

GIB = 1 << 30


def test_enforce_eager_is_a_switch_and_takes_a_value_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args([]).enforce_eager is False
    assert build_parser().parse_args(["--enforce-eager"]).enforce_eager is True
    assert build_parser().parse_args(["--enforce-eager", "false"]).enforce_eager is False
    monkeypatch.setenv("CUSTOMLLM_ENFORCE_EAGER", "true")
    assert build_parser().parse_args([]).enforce_eager is True


def test_gpu_memory_utilization_defaults_to_vllms_and_rejects_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args([])
    assert args.gpu_memory_utilization == 0.9 and args.kv_cache_tokens is None
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--gpu-memory-utilization", bad])
        assert "--gpu-memory-utilization" in capsys.readouterr().err


def test_gpu_cache_takes_the_share_left_after_weights_and_the_reserve() -> None:
    total = 140 * GIB
    free = total - 3 * GIB  # weights and the CUDA context
    assert gpu_cache_bytes(free, total, 0.9) == int(0.9 * total) - 3 * GIB - _GPU_ACTIVATION_RESERVE
    assert gpu_cache_bytes(free, total, 0.5) < gpu_cache_bytes(free, total, 0.9)


def test_gpu_cache_with_no_room_names_the_flags() -> None:
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0\.1 leaves no room.*--kv-cache-tokens"):
        gpu_cache_bytes(free=100 * GIB, total=140 * GIB, utilization=0.1)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        gpu_cache_bytes(free=100 * GIB, total=140 * GIB, utilization=0.0)
