"""The Triton MLA decode kernel against a plain torch loop, on CPU under TRITON_INTERPRET=1 (or on CUDA)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before the import
triton = pytest.importorskip("triton")

from model.ops.triton.mla_decode import mla_decode, num_splits_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, tables: list[list[int]],
              lens: list[int], scale: float) -> torch.Tensor:
    """Per sequence and head: gather its context entries by slot, score c and its own k_rope, float32 softmax."""
    latent, (heads, rope) = q_lat.shape[-1], q_rope.shape[1:]
    flat = cache.view(-1, cache.shape[-1]).float()
    bs = cache.shape[1]
    outs = []
    for i, (table, n) in enumerate(zip(tables, lens, strict=True)):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)], device=cache.device)
        c, k_rope = flat[slots, :latent], flat[slots, latent:].view(n, heads, rope)  # [n, L], [n, H, R]
        scores = q_lat[i].float() @ c.T + torch.einsum("hr,nhr->hn", q_rope[i].float(), k_rope)  # [H, n]
        outs.append(torch.softmax(scores * scale, dim=-1) @ c)  # [H, L]
    return torch.stack(outs)


def make_case(seed: int, lens: list[int], heads: int, latent: int, rope: int, bs: int, num_blocks: int,
              dtype: torch.dtype, table_width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    f = latent + heads * rope
    cache = torch.randn(num_blocks, bs, f, generator=g).to(dtype)
    # Blocks handed out shuffled, so a sequence's blocks are neither contiguous nor in order.
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lens:
        need = -(-n // bs)
        tables.append([perm.pop() for _ in range(need)])
    width = table_width or max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lat = torch.randn(len(lens), heads, latent, generator=g).to(dtype)
    q_rope = torch.randn(len(lens), heads, rope, generator=g).to(dtype)
    return q_lat, q_rope, cache, tables, padded


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_reference_ragged_lengths_across_block_boundaries(dtype: torch.dtype, tol: float) -> None:
    lens = [1, 15, 16, 17, 40, 70]  # block size 16: inside, at and past block boundaries
    q_lat, q_rope, cache, tables, padded = make_case(0, lens, heads=3, latent=16, rope=4, bs=16, num_blocks=24,
                                                     dtype=dtype)
    got = mla_decode(q_lat.to(DEVICE), q_rope.to(DEVICE), cache.to(DEVICE), padded.to(DEVICE),
                     torch.tensor(lens, dtype=torch.int32, device=DEVICE), 0.125)
    want = reference(q_lat, q_rope, cache, tables, lens, 0.125)
    assert got.shape == (len(lens), 3, 16) and got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_splits_merge_to_the_same_result(num_splits: int) -> None:
    """Splits beyond a short sequence's context are empty and must not disturb the merge."""
    lens = [3, 33, 90]
    q_lat, q_rope, cache, tables, padded = make_case(1, lens, heads=2, latent=8, rope=8, bs=8, num_blocks=20,
                                                     dtype=torch.float32, table_width=12)
    got = mla_decode(q_lat.to(DEVICE), q_rope.to(DEVICE), cache.to(DEVICE), padded.to(DEVICE),
                     torch.tensor(lens, dtype=torch.int64, device=DEVICE), 0.3, num_splits=num_splits)
    want = reference(q_lat, q_rope, cache, tables, lens, 0.3)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_reads_nothing_past_the_context() -> None:
    """Entries after each context (same block or table padding) are poisoned with NaN; the result stays exact."""
    lens = [5, 20]
    q_lat, q_rope, cache, tables, padded = make_case(2, lens, heads=2, latent=8, rope=4, bs=8, num_blocks=10,
                                                     dtype=torch.float32, table_width=6)
    poisoned = torch.full_like(cache, float("nan"))
    flat, src = poisoned.view(-1, cache.shape[-1]), cache.view(-1, cache.shape[-1])
    for table, n in zip(tables, lens, strict=True):
        for p in range(n):
            slot = table[p // 8] * 8 + p % 8
            flat[slot] = src[slot]
    got = mla_decode(q_lat.to(DEVICE), q_rope.to(DEVICE), poisoned.to(DEVICE), padded.to(DEVICE),
                     torch.tensor(lens, dtype=torch.int32, device=DEVICE), 0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), reference(q_lat, q_rope, cache, tables, lens, 0.5), atol=1e-5, rtol=1e-5)


def test_num_splits_fills_the_gpu_without_tiny_splits() -> None:
    assert num_splits_for(1, 2048) == 64  # 2048 / 32-token iterations
    assert num_splits_for(256, 2048) == 2
    assert num_splits_for(512, 2048) == 1
    assert num_splits_for(4, 40) == 2  # never a split shorter than one iteration


def test_backend_through_attention_metadata_matches_the_torch_backend() -> None:
    """The registered backend (model/ops/mla_decode.py) reads block tables and context lengths from the metadata."""
    from model.metadata import AttentionMetadata
    from model.ops.mla_decode import TorchMLADecode, TritonMLADecode

    lens = [9, 1, 26]
    q_lat, q_rope, cache, tables, _ = make_case(4, lens, heads=3, latent=16, rope=8, bs=4, num_blocks=16,
                                                dtype=torch.float32)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, 4, DEVICE)
    args = (q_lat.to(DEVICE), q_rope.to(DEVICE), cache.to(DEVICE), meta, 0.2)
    torch.testing.assert_close(TritonMLADecode().mix(*args).cpu(), TorchMLADecode().mix(*args).cpu(),
                               atol=1e-5, rtol=1e-5)
