"""CustomLLM: the DeepSeek-style decoder (MLA + MoE) over a flat batch of tokens.

Shapes: T tokens in the batch, D hidden, V vocab, E routed experts.
Parameter names are exactly those of the training checkpoints (MODEL_SPEC.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from model.attention import MultiHeadLatentAttention
from model.config import ModelConfig
from model.layers import PackedLinear, RMSNorm, rope_cos_sin
from model.metadata import AttentionMetadata
from model.moe import MoE
from model.ops.linear import PlainLinear, Preparable, select_linear_backend


class MLP(nn.Module):
    """Holds the MoE under the name `mlp.moe`, matching the checkpoint tree."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.moe = MoE(config.hidden_size, config.intermediate_size, config.num_shared_experts,
                       config.num_routed_experts, config.top_k_experts)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config.hidden_size, config.num_attention_heads, config.latent_dim)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor, expert_counts: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_norm(x), cos, sin, meta, cache)
        return x + self.mlp.moe(self.post_attn_norm(x), expert_counts)


class CustomLLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        # No final norm before lm_head: the trained model has none.
        self.lm_head = PackedLinear(config.hidden_size, config.vocab_size, bias=True)
        self.linear_backend: PlainLinear | None = None  # set by prepare_for_inference

    def _preparable(self) -> list[Preparable]:
        modules: list[Preparable] = [self.lm_head]
        for layer in self.decoder_layers:
            assert isinstance(layer, DecoderLayer)
            modules += [layer.input_norm, layer.self_attn, layer.post_attn_norm, layer.mlp.moe]
        return modules

    @torch.no_grad()
    def prepare_for_inference(self, backend: PlainLinear | str = "auto") -> None:
        """Build the derived weights forward runs on (fused projections, backend-packed matrices), once.

        NOTE: the weights are frozen from here on: load_state_dict re-prepares, but writing a parameter in
        place does not reach the prepared copies. A copying backend (packed oneDNN, cpp-bf16's panels, int8)
        releases the dense expert weights (87% of the model) instead of holding them twice, and state_dict
        unpacks them; the small attention projections and lm_head keep their dense weights next to the derived
        copies (~9% extra).
        """
        if isinstance(backend, str):
            weight = self.lm_head.bias  # never released: it has the model's real device and dtype
            backend = select_linear_backend(weight.device, weight.dtype, backend)
        self.unprepare()
        for module in self._preparable():
            module.prepare(backend)
        self.linear_backend = backend

    @torch.no_grad()
    def unprepare(self) -> None:
        """Drop the derived weights and restore any released dense ones (exact)."""
        for module in self._preparable():
            module.unprepare()
        self.linear_backend = None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        backend = self.linear_backend
        self.unprepare()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if backend is not None:
            self.prepare_for_inference(backend)
        return result

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor], expert_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, D] for a flat batch. input_ids, positions [T]; expert_counts [layers, E] accumulates
        the tokens routed to each expert when given."""
        if self.linear_backend is None:
            with torch.inference_mode(False):  # derived weights must outlive inference mode
                self.prepare_for_inference()
        x = self.token_embeddings(input_ids) + self.position_embeddings(positions)
        cos, sin = rope_cos_sin(positions, self.config.rope_dim, self.config.rope_theta)
        for i, layer in enumerate(self.decoder_layers):
            counts = expert_counts[i] if expert_counts is not None else None
            x = layer(x, cos, sin, meta, kv_caches[i], counts)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] in float32 for the hidden states [N, D] of the tokens that are sampled."""
        if self.linear_backend is None:
            with torch.inference_mode(False):
                self.prepare_for_inference()
        return self.lm_head(hidden).float()
