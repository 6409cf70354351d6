"""Building a tiny real engine for tests, and driving it from synchronous test code."""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from model import ModelConfig, PagedLatentCache
from model.kv_cache import blocks_for
from server.engine.cuda_graphs import DecodeGraphRunner
from server.engine.engine import Engine
from server.engine.model_runner import ModelRunner
from server.engine.outputs import SequenceOutput
from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.speculative_config import SpeculativeConfig
from tests.model.conftest import TINY, random_model


def make_engine(num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 32,
                max_num_batched_tokens: int = 256, max_model_len: int = 256, seed: int = 1,
                enable_prefix_caching: bool = True, static_decode: bool = False,
                enable_return_routed_experts: bool = False,
                speculative_config: SpeculativeConfig | None = None) -> Engine:
    """A float32 TINY engine (vocab 97, EOS 0) with the weights random_state(tiny_config(max_model_len), seed); not
    started. static_decode: decode steps through the graph runner's static buffers (eagerly, on CPU), with its
    scratch block after the scheduler's blocks."""
    model_config = tiny_config(max_model_len)
    model = random_model(model_config, seed)
    cache = PagedLatentCache(model_config, num_blocks + static_decode, block_size, torch.float32)
    decode = None
    if static_decode:
        decode = DecodeGraphRunner(model, cache.layers, max_num_seqs=max_num_seqs,
                                   max_blocks_per_seq=blocks_for(max_model_len, block_size), block_size=block_size,
                                   scratch_block=num_blocks, use_cuda_graphs=False,
                                   record_routed_experts=enable_return_routed_experts)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, block_size=block_size, num_blocks=num_blocks,
                          enable_prefix_caching=enable_prefix_caching)
    runner = ModelRunner(model, cache, Sampler(seed=0), eos_token_id=0, decode_runner=decode,
                         enable_return_routed_experts=enable_return_routed_experts)
    return Engine(runner, config, TINY.vocab_size, speculative_config=speculative_config)


def tiny_config(max_model_len: int = 256) -> ModelConfig:
    """The model configuration of make_engine(max_model_len=...)."""
    return dataclasses.replace(TINY, max_position_embeddings=max(max_model_len, 256))


async def collect(engine: Engine, request_id: str, prompt: list[int],
                  params: SamplingParams) -> dict[int, tuple[list[int], str]]:
    """Run one request to the end: sample index -> (tokens, finish_reason)."""
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    async for batch in engine.add_request(request_id, prompt, params):
        for out in batch:
            tokens.setdefault(out.index, []).extend(out.token_ids)
            if out.finish_reason is not None:
                reasons[out.index] = out.finish_reason
    return {i: (tokens.get(i, []), reasons[i]) for i in reasons}


def run_all(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[dict[int, tuple[list[int], str]]]:
    """Submit all requests at once and wait for all of them."""
    async def main() -> list[dict[int, tuple[list[int], str]]]:
        return await asyncio.gather(*(collect(engine, f"r{i}", p, sp) for i, (p, sp) in enumerate(requests)))
    return asyncio.run(main())


__all__ = ["SequenceOutput", "collect", "make_engine", "run_all"]
