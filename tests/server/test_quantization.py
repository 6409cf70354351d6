"""`--quantization int8` end to end: the real CLI (flag from CUSTOMLLM_QUANTIZATION) serves the tiny checkpoint
over HTTP, and its greedy tokens are the float32 reference's while the reference's choice is clear.

What is asserted and why: int8 weights move every logit a little (on this tiny random model up to ~0.5 over
the whole vocabulary, against a logit spread of ~3), so greedy decoding may legitimately pick another token
wherever the reference's best two tokens are close. For each of fixed candidate prompts the test takes the
leading reference steps whose winner leads by more than MARGIN (2x that measured error: both logits would have
to move by more than it, in opposite directions, to swap), stopping at the first close one, until it has
CLEAR_STEPS such steps over all prompts; it asserts that the served text of each prompt is exactly those
tokens. A broken int8 path (wrong scales, transposed weights, a kernel misreading its input) moves logits by
far more than that and fails it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from bench.local_server import free_port
from server.cli import build_parser
from server.tokenizer import load_tokenizer
from tests.model.reference import reference_logits
from tests.server.live import TINY_SERVE

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 4  # per prompt
CLEAR_STEPS = 8  # in all
MARGIN = 1.0


def _clear_references(checkpoint: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt, its leading float32 greedy tokens that each win by more than MARGIN) for fixed candidate prompts,
    until CLEAR_STEPS tokens are collected."""
    sd = load_file(checkpoint / "model.safetensors")
    found: list[tuple[list[int], list[int]]] = []
    for start in range(1000, 40000, 997):
        prompt = list(range(start, start + 8))
        ids = list(prompt)
        for _ in range(MAX_STEPS):
            top = reference_logits(sd, TINY_SERVE, ids)[-1].topk(2)
            if float(top.values[0] - top.values[1]) <= MARGIN:
                break
            ids.append(int(top.indices[0]))
        if len(ids) > len(prompt):
            found.append((prompt, ids[len(prompt):]))
        if sum(len(tokens) for _, tokens in found) >= CLEAR_STEPS:
            return found
    raise AssertionError("too few candidate steps with clear margins")


def test_quantization_flag_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args([]).quantization == "none"
    assert build_parser().parse_args(["--quantization", "int8"]).quantization == "int8"
    monkeypatch.setenv("CUSTOMLLM_QUANTIZATION", "int8")
    assert build_parser().parse_args([]).quantization == "int8"
    monkeypatch.setenv("CUSTOMLLM_QUANTIZATION", "int3")
    with pytest.raises(SystemExit):
        build_parser()


def test_int8_server_greedy_tokens_match_float32_where_margins_are_clear(tiny_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    cases = _clear_references(tiny_checkpoint)
    port = free_port()
    log = tmp_path / "server.log"
    env = os.environ | {"CUSTOMLLM_QUANTIZATION": "int8", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_checkpoint), "--port",
                                 str(port), "--dtype", "float32", "--device", "cpu", "--kv-cache-tokens", "4096"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not healthy in 90 s:\n" + log.read_text()
            time.sleep(0.2)
        texts = []
        for prompt, expected in cases:
            body = {"prompt": prompt, "max_tokens": len(expected), "temperature": 0.0, "ignore_eos": True}
            reply = httpx.post(base + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == len(expected)
            texts.append(reply.json()["choices"][0]["text"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert re.search(r"\n +int8 linear +int8-", log.read_text())  # the int8 backend ran; the table says which
    tokenizer = load_tokenizer(None)
    assert texts == [tokenizer.decode(expected) for _, expected in cases]
