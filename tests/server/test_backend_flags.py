"""--linear-backend, --attention-backend, --moe-backend: parsed (and read from CUSTOMLLM_<FLAG>), a named backend
that cannot run is a CLI error naming the flag, the backend and why, and the start-up log has one backend table."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from model import ModelConfig
from server.cli import build_parser, main
from server.startup import load_for_serving

SMALL = ModelConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, latent_dim=16,
                    intermediate_size=32, num_experts=3, num_shared_experts=1, top_k_experts=1,
                    max_position_embeddings=64)


def test_flags_default_to_auto_and_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args([])
    assert (args.linear_backend, args.attention_backend, args.moe_backend) == ("auto", "auto", "auto")
    args = build_parser().parse_args(["--moe-backend", "torch", "--attention-backend", "torch"])
    assert (args.moe_backend, args.attention_backend) == ("torch", "torch")
    monkeypatch.setenv("CUSTOMLLM_LINEAR_BACKEND", "plain")
    assert build_parser().parse_args([]).linear_backend == "plain"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--moe-backend", "fastest"])


def test_a_named_backend_that_cannot_run_is_a_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    # grouped-mm never reads int8 weights, on any machine.
    assert main(["--quantization", "int8", "--moe-backend", "grouped-mm", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error: --moe-backend grouped-mm: the MoE experts backend grouped-mm cannot run on cpu" in err
    assert "does not read int8 weights" in err
    assert main(["--linear-backend", "int8-pack", "--device", "cpu"]) == 2
    assert "--linear-backend int8-pack: an int8 linear backend needs --quantization int8" in capsys.readouterr().err


def test_start_up_logs_one_table_of_the_chosen_backends(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="server.startup"):
        model = load_for_serving(None, torch.float32, torch.device("cpu"), 0, config=SMALL, moe_backend="torch")
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backends for cpu float32")]
    assert len(tables) == 1
    for op in ("linear", "MLA decode", "MoE experts", "RMSNorm"):
        assert re.search(rf"^ +{op} +\S+ +auto", tables[0], re.M) or op == "MoE experts", tables[0]
    assert re.search(r"^ +MoE experts +torch +asked for by name$", tables[0], re.M), tables[0]
    assert model.backends is not None and model.backends.experts.name == "torch"
