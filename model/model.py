"""CustomLLM: the DeepSeek-style decoder (MLA + MoE) over a flat batch of tokens.

Shapes: T tokens in the batch, D hidden, V vocab, E routed experts.
Parameter names are exactly those of the training checkpoints (MODEL_SPEC.md).
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import MultiHeadLatentAttention
from model.backends import ModelBackends
from model.config import ModelConfig
from model.layers import NOT_PROCESSED, Linear, ProcessesWeights, RMSNorm, rope_cos_sin
from model.metadata import AttentionMetadata
from model.moe import MoE
from model.ops.decode_layer import DecodeLayerBackend, FusedDecode


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
        self.fused_decode: FusedDecode | None = None  # all-decode steps in one call (model/ops/decode_layer.py)

    def bind_decode(self, backend: DecodeLayerBackend) -> None:
        """After its modules' weights are processed: what runs this layer's all-decode steps."""
        self.fused_decode = backend.bind(self)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                cache: torch.Tensor, expert_counts: torch.Tensor | None,
                routed_experts: torch.Tensor | None) -> torch.Tensor:
        # One new token per sequence and no prefill: the fused path, if the decode layer backend gave one. It does
        # not hand back the routed expert ids, so a step that records them runs the modules.
        one_token_each = meta.num_prefill_tokens == 0 and meta.decode_block_tables.shape[0] == x.shape[0]
        if self.fused_decode is not None and one_token_each and routed_experts is None:
            return self.fused_decode(x, cos, sin, meta, cache, expert_counts)
        x = x + self.self_attn(self.input_norm(x), cos, sin, meta, cache)
        return x + self.mlp.moe(self.post_attn_norm(x), expert_counts, routed_experts)


class CustomLLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        # No final norm before lm_head: the trained model has none.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)
        self.num_parameters = sum(p.numel() for p in self.parameters())  # the checkpoint's, before processing
        self.backends: ModelBackends | None = None  # set by process_weights

    @torch.no_grad()
    def process_weights(self, backends: ModelBackends) -> None:
        """Turn the loaded checkpoint tensors into what each module's backend runs on, once (vLLM's
        process_weights_after_loading). The converted checkpoint tensors are dropped: from here on the model
        runs and has no state dict to save (read a checkpoint's tensors from its file)."""
        assert self.backends is None, "the weights are processed once"
        self.lm_head.process_weights(backends)
        for layer in self.decoder_layers:
            assert isinstance(layer, DecoderLayer)
            modules: list[ProcessesWeights] = [layer.input_norm, layer.self_attn, layer.post_attn_norm,
                                               layer.mlp.moe]
            for module in modules:
                module.process_weights(backends)
            layer.bind_decode(backends.decode_layer)
        self.backends = backends

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor], expert_counts: torch.Tensor | None = None,
                routed_experts: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, D] for a flat batch. input_ids, positions [T]; expert_counts [layers, E] accumulates
        the tokens routed to each expert when given; routed_experts [T, layers, K] int32 receives each token's
        top-k routed expert ids per layer when given."""
        assert self.backends is not None, NOT_PROCESSED
        x = self.token_embeddings(input_ids) + self.position_embeddings(positions)
        cos, sin = rope_cos_sin(positions, self.config.rope_dim, self.config.rope_theta)
        for i, layer in enumerate(self.decoder_layers):
            counts = expert_counts[i] if expert_counts is not None else None
            routed = routed_experts[:, i] if routed_experts is not None else None  # [T, K], a strided view
            x = layer(x, cos, sin, meta, kv_caches[i], counts, routed)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] in float32 for the hidden states [N, D] of the tokens that are sampled."""
        return self.lm_head(hidden).float()
