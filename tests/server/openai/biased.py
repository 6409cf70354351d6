"""A tiny checkpoint whose lm_head favours closing tokens, for tests of constrained output.

A random model under a grammar picks among the allowed tokens at random, so it would write one JSON string (or
array, or number) until max_tokens. Here lm_head's bias is raised for the tokens made only of `"`, `}` and `]`
and for EOS: whenever the grammar lets a value, an object or the output end, the model mostly does, and outputs
stay short. Unconstrained, this model mostly stops at once (EOS); tests that need free text pass ignore_eos.
"""

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file, save_file

from server.tokenizer import load_tokenizer
from tests.server.live import LiveServer, live_server, write_tiny_checkpoint

CLOSING_BIAS = 20.0


def write_biased_checkpoint(directory: Path, token_ids: list[int], bias: float) -> Path:
    """The tiny test checkpoint with lm_head.bias raised by `bias` for `token_ids`."""
    write_tiny_checkpoint(directory)
    state = load_file(directory / "model.safetensors")
    state["lm_head.bias"][token_ids] += bias
    save_file(state, directory / "model.safetensors")
    return directory


def write_closing_biased_checkpoint(directory: Path) -> Path:
    """The tiny test checkpoint with lm_head.bias raised by CLOSING_BIAS for closing tokens and EOS."""
    tok = load_tokenizer(None)
    closing = [i for i in range(tok.vocab_size) if (t := tok.decode([i])) and set(t) <= set('"}]')]
    return write_biased_checkpoint(directory, [*closing, tok.eos_token_id], CLOSING_BIAS)


@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_closing_biased_checkpoint(tmp_path_factory.mktemp("biased-ckpt"))


@pytest.fixture(scope="module")
def server(biased_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(biased_checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=120)
