"""The served path (paged latent cache, chunked prefill, absorbed decode, batched MoE) against the reference."""

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from model import AttentionMetadata, CustomLLM, ModelConfig, PagedLatentCache
from model.moe import MoE
from model.ops import cpu_extension, mla_decode
from tests.model.conftest import TINY, random_model
from tests.model.reference import reference_logits

BLOCK = 4


class PagedRunner:
    """Minimal block bookkeeping for driving the model in tests: shuffled free blocks, per-sequence tables."""

    def __init__(self, model: CustomLLM, num_blocks: int = 96) -> None:
        self.model = model
        self.cache = PagedLatentCache(model.config, num_blocks, BLOCK, model.lm_head.bias.dtype)
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)  # non-contiguous tables
        self.tables: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """chunks: (seq, new token ids). Returns logits [num chunks, V] of each chunk's last token."""
        ids, positions, q_lens, ctx_lens, tables = [], [], [], [], []
        for seq, new in chunks:
            start = self.computed.get(seq, 0)
            end = start + len(new)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK < end:
                table.append(self.free.pop())
            ids += new
            positions += range(start, end)
            q_lens.append(len(new))
            ctx_lens.append(end)
            tables.append(table)
            self.computed[seq] = end
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, BLOCK)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.cache.layers)
        last = torch.tensor(q_lens).cumsum(0) - 1
        return self.model.compute_logits(hidden[last])


def test_seed_config_shapes_on_meta() -> None:
    with torch.device("meta"):
        model = CustomLLM(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 973_122_258
    sd = model.state_dict()
    cfg = ModelConfig()
    expected = {
        "token_embeddings.weight": (49152, 768), "position_embeddings.weight": (2048, 768),
        "lm_head.weight": (49152, 768), "lm_head.bias": (49152,),
    }
    for n in range(30):
        p = f"decoder_layers.{n}"
        a = f"{p}.self_attn"
        m = f"{p}.mlp.moe"
        expected |= {
            f"{p}.input_norm.weight": (768,), f"{p}.post_attn_norm.weight": (768,),
            f"{a}.kv_proj_d.weight": (192, 768), f"{a}.q_proj_d.weight": (192, 768),
            f"{a}.k_proj_u.weight": (384, 192), f"{a}.v_proj_u.weight": (768, 192),
            f"{a}.q_proj_u.weight": (384, 192), f"{a}.rope_k.weight": (384, 768),
            f"{a}.rope_q.weight": (384, 192), f"{a}.o_proj.weight": (768, 768),
            f"{m}.router.weight": (7, 768), f"{m}.routing_bias": (7,),
        }
        for e in [f"shared_experts.{i}" for i in range(1)] + [f"routed_experts.{i}" for i in range(7)]:
            expected |= {f"{m}.{e}.gate_proj.weight": (1536, 768), f"{m}.{e}.up_proj.weight": (1536, 768),
                         f"{m}.{e}.down_proj.weight": (768, 1536)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert cfg.kv_entry_dim == 576
    assert PagedLatentCache.bytes_per_token(cfg, torch.bfloat16) == 34_560


def test_mixed_batches_chunked_prefill_and_decode_match_reference(tiny_model: CustomLLM,
                                                                   tiny_state: dict[str, torch.Tensor]) -> None:
    sd = tiny_state
    gen = random.Random(3)
    prompts = {s: [gen.randrange(TINY.vocab_size) for _ in range(n)] for s, n in enumerate([1, 3, 7, 12, 20, 30])}
    chunked = 5  # the 30-token prompt arrives in 3 chunks over 3 steps
    chunk_plan = [prompts[chunked][:11], prompts[chunked][11:23], prompts[chunked][23:]]
    runner = PagedRunner(tiny_model)
    tokens = {s: list(p) for s, p in prompts.items()}
    started: set[int] = set()
    checked = 0
    for step in range(24):
        chunks: list[tuple[int, list[int]]] = []
        # Sequences join at different steps so prefills and decodes mix in one batch.
        for s in range(5):
            if s in started:
                chunks.append((s, tokens[s][-1:]))
            elif step >= s // 2:
                chunks.insert(0, (s, prompts[s]))
                started.add(s)
        if step < 3:
            chunks.insert(0, (chunked, chunk_plan[step]))
        elif step >= 3:
            chunks.append((chunked, tokens[chunked][-1:]))
        if step == 7:
            chunks.reverse()  # decodes before prefills: every sequence then takes the prefill path
        logits = runner.step(chunks)
        for (s, _), row in zip(chunks, logits, strict=True):
            if s == chunked and step < 2:
                continue  # mid-prompt chunk: nothing is sampled
            ref = reference_logits(sd, TINY, tokens[s])[-1]
            torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4)
            assert int(row.argmax()) == int(ref.argmax())
            tokens[s].append(int(row.argmax()))
            checked += 1
    assert all(len(tokens[s]) - len(prompts[s]) >= 20 for s in tokens)
    assert checked > 100


# torch with chunk 1: every sequence is its own decode chunk; cpp: the fused kernel, split over the context.
@pytest.mark.parametrize(("backend", "chunk_bytes"), [("torch", None), ("torch", 1), ("cpp", None)])
def test_absorbed_decode_equals_decompressed_attention(backend: str, chunk_bytes: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "cpp" and not cpu_extension.load():
        pytest.skip("CPU extension unavailable on this machine")
    tiny_model = random_model(TINY, 1, attention=backend)
    if chunk_bytes is not None:
        monkeypatch.setattr(mla_decode, "_DECODE_CHUNK_BYTES", chunk_bytes)
    runner = PagedRunner(tiny_model)
    lens = [5, 9, 17]
    for s, n in enumerate(lens):
        runner.step([(s, list(range(1, n + 1)))])
    attn = tiny_model.decoder_layers[1].self_attn
    cache = runner.cache.layers[1]
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(3, attn.num_heads, attn.nope_dim, generator=g)
    q_rope = torch.randn(3, attn.num_heads, attn.rope_dim, generator=g)
    tables = [runner.tables[s] for s in range(3)]
    decode_meta = AttentionMetadata.build([1, 1, 1], lens, tables, BLOCK)
    assert decode_meta.num_prefill_tokens == 0
    prefill_meta = AttentionMetadata(
        slot_mapping=decode_meta.slot_mapping, num_prefill_tokens=3, prefill_query_lens=[1, 1, 1],
        prefill_context_lens=lens,
        prefill_context_slots=torch.cat([(torch.tensor(t)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
                                         for t, n in zip(tables, lens, strict=True)]),
        decode_block_tables=torch.zeros(0, 1, dtype=torch.int64), decode_valid=torch.zeros(0, 4, dtype=torch.bool))
    q = torch.cat((q_nope, q_rope), dim=-1)
    prep = attn.weights
    assert prep is not None and prep.decode.name == backend
    if backend == "cpp":
        prep = dataclasses.replace(prep, decode=mla_decode.CppMLADecode(num_splits=2))  # split over the context
    with torch.inference_mode():  # as in the model's forward
        absorbed = attn._decode(prep, q, decode_meta, cache)
        decompressed = attn._prefill(prep, q, prefill_meta, cache.view(-1, cache.shape[-1]))
    torch.testing.assert_close(absorbed, decompressed, atol=1e-5, rtol=1e-5)


def _per_token_moe(moe: MoE, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MoE token by token on the checkpoint's tensors of layer 0."""
    def expert(kind: str, e: int, xt: torch.Tensor) -> torch.Tensor:
        w = {n: state[f"decoder_layers.0.mlp.moe.{kind}.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
        return F.linear(F.silu(F.linear(xt, w["gate_proj"])) * F.linear(xt, w["up_proj"]), w["down_proj"])

    out = torch.zeros_like(x)
    weights, experts = moe.route(x)
    for t in range(x.shape[0]):
        out[t] = expert("shared_experts", 0, x[t : t + 1])[0]
        for w, e in zip(weights[t], experts[t], strict=True):
            out[t] += w * expert("routed_experts", int(e), x[t : t + 1])[0]
    return out


def test_batched_moe_dispatch_matches_per_token_loop(tiny_model: CustomLLM,
                                                     tiny_state: dict[str, torch.Tensor]) -> None:
    moe = tiny_model.decoder_layers[0].mlp.moe
    x = torch.randn(37, TINY.hidden_size, generator=torch.Generator().manual_seed(5))
    counts = torch.zeros(moe.num_routed_experts, dtype=torch.int64)
    torch.testing.assert_close(moe(x, counts), _per_token_moe(moe, tiny_state, x), atol=1e-5, rtol=1e-5)
    assert int(counts.sum()) == 37 * 2

    # A bias that sends every token to experts 1 and 3: the others get no token at all.
    with torch.no_grad():
        saved = moe.routing_bias.clone()
        moe.routing_bias.copy_(torch.tensor([-50.0, 50.0, -50.0, 50.0]))
    try:
        counts.zero_()
        torch.testing.assert_close(moe(x, counts), _per_token_moe(moe, tiny_state, x), atol=1e-5, rtol=1e-5)
        assert counts.tolist() == [0, 37, 0, 37]
        torch.testing.assert_close(moe(x[:1]), _per_token_moe(moe, tiny_state, x[:1]), atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            moe.routing_bias.copy_(saved)
