"""CUDA-only checks (skipped without a GPU; tools/gpu_check.sh runs them on a lent one): the tiny model on CUDA
against CPU, the decode graph replay against the same static path run eagerly, the engine with graphs."""

from __future__ import annotations

import random

import pytest
import torch

from model import AttentionMetadata, CustomLLM, PagedLatentCache
from server.engine.cuda_graphs import DecodeGraphRunner
from tests.model.conftest import TINY, random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BS = 4


def tiny(device: str, dtype: torch.dtype = torch.float32) -> CustomLLM:
    return random_model(TINY, 5, dtype, device)


def step(model: CustomLLM, caches: list[torch.Tensor], ids: list[int], lens: list[int], tables: list[list[int]],
         query_lens: list[int]) -> torch.Tensor:
    device = caches[0].device
    positions = [p for q, n in zip(query_lens, lens, strict=True) for p in range(n - q, n)]
    meta = AttentionMetadata.build(query_lens, lens, tables, BS, device)
    hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta, caches)
    return model.compute_logits(hidden).cpu()


def test_cuda_float32_matches_cpu_prefill_then_decode() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(1, TINY.vocab_size) for _ in range(n)] for n in (5, 17, 9)]
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    logits = {}
    for device in ("cpu", "cuda"):
        model = tiny(device)
        caches = PagedLatentCache(TINY, 25, BS, torch.float32, device).layers
        out = [step(model, caches, [t for p in prompts for t in p], [len(p) for p in prompts], tables,
                    [len(p) for p in prompts])]
        seqs = [list(p) for p in prompts]
        for _ in range(6):  # greedy decode from the CPU's choices, so both see the same tokens
            nxt = [7 + len(s) for s in seqs]
            for s, t in zip(seqs, nxt, strict=True):
                s.append(t)
            out.append(step(model, caches, nxt, [len(s) for s in seqs], tables, [1, 1, 1]))
        logits[device] = torch.cat(out)
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_static_path_run_eagerly(dtype: torch.dtype) -> None:
    model = tiny("cuda", dtype)
    base = PagedLatentCache(TINY, 65, BS, dtype, "cuda").layers
    for layer in base:
        layer.normal_()
    runners = {graphs: DecodeGraphRunner(model, [c.clone() for c in base], max_num_seqs=16, max_blocks_per_seq=8,
                                         block_size=BS, scratch_block=64, use_cuda_graphs=graphs,
                                         record_routed_experts=True)
               for graphs in (True, False)}
    runners[True].capture_all()
    rng = random.Random(1)
    # Steps that record the routed experts (their own graphs) between steps that do not.
    for b, record in ((3, True), (16, False), (1, True), (9, False), (9, True), (2, False)):
        lens = [rng.randint(1, 32) for _ in range(b)]
        tables = [list(range(i * 8, i * 8 + 8))[:-(-n // BS)] for i, n in enumerate(lens)]
        ids = [rng.randrange(1, TINY.vocab_size) for _ in range(b)]
        out = {g: r.run(ids, [n - 1 for n in lens], lens, tables, record) for g, r in runners.items()}
        assert torch.equal(out[True][0], out[False][0]), f"step of {b}"
        assert torch.equal(out[True][1], out[False][1])
        routed = out[True][2]
        assert (routed is not None) == record and (not record or torch.equal(routed, out[False][2]))
    for a, b_ in zip(runners[True].caches, runners[False].caches, strict=True):
        assert torch.equal(a, b_)


def test_engine_on_cuda_with_graphs_generates_what_cpu_generates(tiny_checkpoint) -> None:
    from server.engine.sampling_params import SamplingParams
    from server.startup import build_engine
    from tests.server.engine_utils import run_all

    rng = random.Random(2)
    reqs = [([rng.randrange(1, 500) for _ in range(rng.randint(1, 20))],
             SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)) for _ in range(5)]
    outs = []
    for device in ("cpu", "cuda"):
        # Weights loaded before build_engine captures: graphs hold the prepared weights' addresses.
        engine = build_engine(str(tiny_checkpoint), dtype="float32", device=device, kv_cache_tokens="4096",
                              max_num_seqs=8, block_size=BS)
        assert (engine.runner.decode_runner is not None) == (device == "cuda")
        engine.start()
        try:
            outs.append(run_all(engine, reqs))
        finally:
            engine.shutdown()
    assert outs[0] == outs[1]
