"""The paged latent KV cache: per layer [num_blocks, block_size, latent_dim + num_heads * rope_dim]."""

from __future__ import annotations

import torch

from model.config import ModelConfig


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that hold `num_tokens` (ceiling division)."""
    return -(-num_tokens // block_size)


class PagedLatentCache:
    """Fixed pool of cache blocks for every layer; block ids are handed out by the server's block manager."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        assert num_blocks >= 1 and block_size >= 1, f"num_blocks={num_blocks} block_size={block_size}"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.entry_dim = config.kv_entry_dim
        self.layers = [torch.zeros(num_blocks, block_size, self.entry_dim, dtype=dtype, device=device)
                       for _ in range(config.num_hidden_layers)]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Cache bytes one token of context takes over all layers (34,560 for the seed model in bf16)."""
        return config.kv_entry_dim * config.num_hidden_layers * torch.finfo(dtype).bits // 8
