"""The fused MLA decode kernel against the torch path (the oracle) on random inputs."""

from __future__ import annotations

import pytest
import torch

from model.metadata import AttentionMetadata
from model.ops import cpu_extension
from model.ops.mla_decode import MLA_DECODE, CppMLADecode, TorchMLADecode
from model.ops.registry import BackendError, Target, select

pytestmark = pytest.mark.skipif(not cpu_extension.load(), reason="CPU extension unavailable on this machine")

BLOCK = 4
HEADS, LATENT, ROPE = 3, 24, 8  # F = 48; 24 is not a multiple of the 16 AVX-512 lanes: the scalar tails run
# bfloat16 inputs are compared with the torch path run in float32 on the same (rounded) values: the kernel
# computes in float32 and rounds once, so only that rounding (2^-8 relative) remains. The torch path in
# bfloat16 rounds scores and probabilities too and lands several times further away.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _case(context_lens: list[int], dtype: torch.dtype, seed: int = 0, heads: int = HEADS, latent: int = LATENT,
          rope: int = ROPE, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block) for n in context_lens]
    # Shuffled block ids, so a sequence's blocks are not contiguous in the cache.
    ids = (torch.randperm(sum(blocks), generator=g) + 1).tolist()
    tables, at = [], 0
    for nb in blocks:
        tables.append(ids[at:at + nb])
        at += nb
    cache = (2 * torch.randn(sum(blocks) + 1, block, latent + heads * rope, generator=g)).to(dtype)
    meta = AttentionMetadata.build([1] * len(context_lens), context_lens, tables, block)
    q_lat = torch.randn(len(context_lens), heads, latent, generator=g).to(dtype)
    q_rope = torch.randn(len(context_lens), heads, rope, generator=g).to(dtype)
    return q_lat, q_rope, cache, meta


def _compare(context_lens: list[int], dtype: torch.dtype, num_splits: int, scale: float = 0.3, **shape: int) -> None:
    q_lat, q_rope, cache, meta = _case(context_lens, dtype, **shape)
    want = TorchMLADecode().mix(q_lat.float(), q_rope.float(), cache.float(), meta, scale)
    got = CppMLADecode(num_splits).mix(q_lat, q_rope, cache, meta, scale)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_ragged_contexts(dtype: torch.dtype, num_splits: int) -> None:
    _compare([1, 5, 13, 2, 30], dtype, num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_block_boundaries(dtype: torch.dtype, k: int) -> None:
    # Contexts of exactly k blocks and one token either side, alone (split over the context) and together.
    lens = [k * BLOCK - 1, k * BLOCK, k * BLOCK + 1]
    for n in lens:
        _compare([n], dtype, num_splits=0)
    _compare(lens, dtype, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [0, 1])
@pytest.mark.parametrize("block", [16, 32])
def test_vector_widths_ragged(dtype: torch.dtype, num_splits: int, block: int) -> None:
    # Blocks of 16 (the server's default) and 32 tokens: the softmax's vector exp runs over whole 8- or 16-lane
    # chunks of a block's scores and a scalar tail (tiles of 1..32 tokens). Latent 40 and rope 24 are vectors and
    # a tail of 8 at 16 lanes; 5 heads: a group of 4 (mix) or 3 (score) and a remainder tile.
    _compare([1, 15, 16, 17, 31, 33, 50], dtype, num_splits, heads=5, latent=40, rope=24, block=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "latent", "rope"), [(1, 8, 8), (2, 16, 4), (7, 72, 12), (13, 200, 36)])
def test_tile_remainders(dtype: torch.dtype, heads: int, latent: int, rope: int) -> None:
    # The register tiles (scores 3 heads x 4 tokens, mix 4 heads x 3 latent vectors; mla_decode_tiles.h) and their
    # remainders: head counts that are not multiples of 3 or 4, blocks cut at every token count mod 4, latents of
    # 1..9 vectors plus scalar tails at 8 or 16 lanes, rope widths below one vector (all scalar) or with a tail,
    # and score counts (heads x tokens) that are not whole vectors for the lane sums.
    # The usual 1/sqrt(width) scale: a fixed 0.3 over 236 products of random values makes the softmax so sharp
    # that float32 summation order alone moves its small weights past the tolerance.
    _compare([1, 2, 3, 4, 5, 16, 17, 35, 64], dtype, num_splits=0, scale=(latent + rope) ** -0.5, heads=heads,
             latent=latent, rope=rope, block=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_shapes(dtype: torch.dtype) -> None:
    # The seed model's head layout (12 heads, latent 192, rope 32): the vector loops without tails.
    _compare([17, 64, 3], dtype, num_splits=0, heads=12, latent=192, rope=32)


@pytest.mark.parametrize("block", [BLOCK, 16])  # 16: the vector exp too
def test_more_splits_than_blocks_and_large_scores(block: int) -> None:
    q_lat, q_rope, cache, meta = _case([6 * block // BLOCK, 2], torch.float32, block=block)
    q_lat *= 30  # scores in the hundreds: the online softmax must rescale without overflow
    want = TorchMLADecode().mix(q_lat, q_rope, cache, meta, 0.3)
    got = CppMLADecode(num_splits=8).mix(q_lat, q_rope, cache, meta, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bad_context_length_is_an_error() -> None:
    q_lat, q_rope, cache, meta = _case([5], torch.float32)
    with pytest.raises(RuntimeError, match="context length"):
        torch.ops.customllm.mla_decode(q_lat, q_rope, cache, meta.decode_block_tables, torch.tensor([9]), 0.3, 0)


def test_selection() -> None:
    cpu = torch.device("cpu")
    assert select(MLA_DECODE, Target(cpu, torch.bfloat16)).backend.name == "cpp"
    assert select(MLA_DECODE, Target(cpu, torch.float16)).backend.name == "torch"
    assert select(MLA_DECODE, Target(cpu, torch.float32), "torch").backend.name == "torch"
    with pytest.raises(BackendError, match="--attention-backend cpp: the MLA decode backend cpp cannot run"):
        select(MLA_DECODE, Target(cpu, torch.float16), "cpp")
