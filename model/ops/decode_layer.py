"""The decode layer op: one decoder layer of an all-decode step (one new token per sequence), chosen once at load.

Shapes: B sequences, D hidden.

`ModuleDecodeLayer` (every device and dtype; the oracle) runs the layer's modules from Python, op by op.
`CppDecodeLayer` (CPU bfloat16/float32; model/csrc/decode_layer.cpp) runs the same ops in the same order in one
extension call per layer (the absorption products as loops, float32 sums in another order; everything else bit
for bit the modules' with the same backends): at decode sizes the ~150 calls a layer makes from Python cost more
than their work (docs/performance.md). It reads the weights the
other backends made: the cpp-bf16 or plain linear, the cpp MLA decode and MoE experts, either RMSNorm; with any
other choice the layers run their modules, and the start-up table says why. Prefill and mixed steps always run
the modules.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from model.ops.linear import CppBF16Linear, LinearBackend, PlainLinear
from model.ops.mla_decode import CppMLADecode, MLADecodeBackend, TorchMLADecode
from model.ops.moe_base import ExpertsBackend
from model.ops.moe_experts import CppExperts, TorchExperts
from model.ops.registry import Backend, MakeTensor, Op, Target
from model.ops.rms_norm import CppRMSNorm, RMSNormBackend, TorchRMSNorm

if TYPE_CHECKING:
    from model.metadata import AttentionMetadata
    from model.model import DecoderLayer

# x [B, D], cos, sin [B, 1, R], meta, the layer's cache, its expert counts [E] or None -> [B, D]
FusedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMetadata", torch.Tensor,
                        torch.Tensor | None], torch.Tensor]


class DecodeLayerBackend(Backend, abc.ABC):
    """The interface: what runs a layer's all-decode steps, bound to each layer once its weights are processed."""

    @abc.abstractmethod
    def unsupported_with(self, linear: LinearBackend, mla_decode: MLADecodeBackend, experts: ExpertsBackend,
                         rms_norm: RMSNormBackend) -> str | None:
        """Why this backend cannot run on the weights these backends make, or None."""

    @abc.abstractmethod
    def bind(self, layer: DecoderLayer) -> FusedDecode | None:
        """The layer's all-decode step as one callable, or None: the layer runs its modules."""


class ModuleDecodeLayer(DecodeLayerBackend):
    name = "modules"

    def unsupported_with(self, linear: LinearBackend, mla_decode: MLADecodeBackend, experts: ExpertsBackend,
                         rms_norm: RMSNormBackend) -> str | None:
        return None

    def bind(self, layer: DecoderLayer) -> FusedDecode | None:
        return None


class CppDecodeLayer(DecodeLayerBackend):
    name = "cpp"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.bfloat16, torch.float32})
    quantizations = frozenset({"none"})
    needs_extension = True

    def unsupported_with(self, linear: LinearBackend, mla_decode: MLADecodeBackend, experts: ExpertsBackend,
                         rms_norm: RMSNormBackend) -> str | None:
        if not isinstance(linear, CppBF16Linear | PlainLinear):
            return f"reads cpp-bf16 or plain linear weights, not {linear.name}"
        if not isinstance(experts, CppExperts):
            return f"runs the cpp MoE experts, not {experts.name}"
        if not isinstance(mla_decode, CppMLADecode):
            return f"runs the cpp MLA decode, not {mla_decode.name}"
        return None

    def bind(self, layer: DecoderLayer) -> FusedDecode | None:
        attn, moe = layer.self_attn, layer.mlp.moe
        prep = attn.weights
        assert prep is not None and moe.shared is not None and moe.routed is not None, "process_weights() first"
        assert isinstance(prep.decode, CppMLADecode)
        weights = [layer.input_norm.weight, prep.w_in, prep.w_q, prep.w_k, prep.w_v_t, attn.o_proj.processed,
                   layer.post_attn_norm.weight, moe.router_weight, moe.routing_bias]
        linear_kind = 0 if isinstance(prep.linear, CppBF16Linear) else 1  # panels or dense (decode_layer.cpp)
        norm_kind = 0 if isinstance(layer.input_norm.backend, CppRMSNorm) else 1
        dims = [attn.num_heads, attn.nope_dim, attn.rope_dim, attn.latent_dim, moe.top_k, prep.decode.num_splits,
                linear_kind, norm_kind]
        params = [layer.input_norm.eps, attn.scale]
        shared, routed = moe.shared, moe.routed
        op = torch.ops.customllm.decode_layer

        def run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor,
                expert_counts: torch.Tensor | None) -> torch.Tensor:
            return op(x, cos, sin, weights, shared.gate_up, shared.down, routed.gate_up, routed.down, cache,
                      meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens, expert_counts, dims,
                      params)

        return run


def _case(backend: DecodeLayerBackend, make: MakeTensor) -> torch.Tensor:
    """A small layer (D=32, 2 heads, L=8, 4 routed experts) decoding 2 sequences of 5 and 9 tokens: [2, 32]."""
    from model.backends import ModelBackends  # here: model.backends imports this module
    from model.config import ModelConfig
    from model.layers import rope_cos_sin
    from model.metadata import AttentionMetadata
    from model.model import DecoderLayer

    config = ModelConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, latent_dim=8,
                         intermediate_size=16, num_experts=5, num_shared_experts=1, top_k_experts=2,
                         max_position_embeddings=64)
    dtype = make(1).dtype
    layer = DecoderLayer(config).to(dtype)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(make(*param.shape, scale=0.3))
    if isinstance(backend, CppDecodeLayer):
        linear: LinearBackend = CppBF16Linear() if dtype == torch.bfloat16 else PlainLinear()
        norm: RMSNormBackend = CppRMSNorm() if dtype == torch.bfloat16 else TorchRMSNorm()
        mla: MLADecodeBackend = CppMLADecode()
        experts: ExpertsBackend = CppExperts()
    else:
        linear, norm, mla, experts = PlainLinear(), TorchRMSNorm(), TorchMLADecode(), TorchExperts()
    backends = ModelBackends(Target(torch.device(make(1).device), dtype), linear, mla, experts, norm, backend, ())
    for module in (layer.input_norm, layer.self_attn, layer.post_attn_norm, layer.mlp.moe):
        module.process_weights(backends)
    layer.bind_decode(backend)
    cache = make(6, 4, config.kv_entry_dim)
    meta = AttentionMetadata.build([1, 1], [5, 9], [[1, 3], [2, 4, 5]], 4, cache.device)
    positions = torch.tensor([4, 8], device=cache.device)
    cos, sin = rope_cos_sin(positions, config.rope_dim, config.rope_theta)
    return layer(make(2, 32), cos, sin, meta, cache, None, None)


DECODE_LAYER: Op[DecodeLayerBackend] = Op(
    "decode layer", None, (CppDecodeLayer, ModuleDecodeLayer), _case,
    {torch.float32: (1e-4, 1e-3), torch.bfloat16: (0.1, 0.05), torch.float16: (0.1, 0.05)})
