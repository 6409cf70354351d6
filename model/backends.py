"""The backends a model runs on, one per op, chosen once before its weights are loaded (model/ops/registry.py).

`--linear-backend` picks from the linear op, or from the int8 linear op under `--quantization int8`;
`--attention-backend` from MLA decode; `--moe-backend` from MoE experts; RMSNorm and the decode layer (one call per
layer for all-decode steps, on the weights the others make) have no flag.
"""

from __future__ import annotations

import dataclasses

import torch

from model.ops.decode_layer import DECODE_LAYER, DecodeLayerBackend, ModuleDecodeLayer
from model.ops.linear import LINEAR, LinearBackend
from model.ops.mla_decode import MLA_DECODE, MLADecodeBackend
from model.ops.moe_base import ExpertsBackend
from model.ops.moe_experts import MOE_EXPERTS
from model.ops.quantized_linear import INT8_LINEAR, QUANTIZATIONS
from model.ops.registry import BackendError, Choice, Target, select
from model.ops.rms_norm import RMS_NORM, RMSNormBackend

# flag -> (what it picks for, the backend names it accepts; both linear ops' for --linear-backend)
BACKEND_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "--linear-backend": ("the linear layers", ("auto", *LINEAR.names, *INT8_LINEAR.names)),
    "--attention-backend": ("decode attention", ("auto", *MLA_DECODE.names)),
    "--moe-backend": ("the MoE experts", ("auto", *MOE_EXPERTS.names)),
}


@dataclasses.dataclass(frozen=True)
class ModelBackends:
    """One backend per op, with the target they were chosen for and the choices (for the start-up table)."""

    target: Target
    linear: LinearBackend
    mla_decode: MLADecodeBackend
    experts: ExpertsBackend
    rms_norm: RMSNormBackend
    decode_layer: DecodeLayerBackend
    choices: tuple[Choice, ...]

    def table(self) -> str:
        """The chosen backends, one op per line: op, backend, why."""
        rows = [("op", "backend", "why")] + [(c.op, c.backend.name, c.reason) for c in self.choices]
        op_w, name_w = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        lines = [f"  {op:<{op_w}}  {name:<{name_w}}  {why}" for op, name, why in rows]
        return f"backends for {self.target}:\n" + "\n".join(lines)


def select_backends(device: torch.device | str, dtype: torch.dtype, quantization: str = "none", *,
                    linear: str = "auto", attention: str = "auto", moe: str = "auto",
                    decode_layer: str = "auto") -> ModelBackends:
    """Every op's backend for this device, dtype and quantization; a named one that cannot run raises
    BackendError (a ValueError) naming the op, the backend and why."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}, expected one of {', '.join(QUANTIZATIONS)}")
    target = Target(torch.device(device), dtype, quantization)
    if linear in INT8_LINEAR.names and quantization != "int8":
        raise BackendError(f"--linear-backend {linear}: an int8 linear backend needs --quantization int8")
    linear_choice = select(INT8_LINEAR if quantization == "int8" else LINEAR, target, linear)
    decode_choice = select(MLA_DECODE, target, attention)
    experts_choice = select(MOE_EXPERTS, target, moe)
    norm_choice = select(RMS_NORM, target)
    layer_choice = select(DECODE_LAYER, target, decode_layer)
    why = layer_choice.backend.unsupported_with(linear_choice.backend, decode_choice.backend, experts_choice.backend,
                                                norm_choice.backend)
    if why is not None and decode_layer != "auto":
        raise BackendError(f"the decode layer backend {decode_layer} cannot run here: {why}")
    if why is not None:
        layer_choice = Choice(DECODE_LAYER.name, ModuleDecodeLayer(), f"auto; not {layer_choice.backend.name}: {why}")
    return ModelBackends(target, linear_choice.backend, decode_choice.backend, experts_choice.backend,
                         norm_choice.backend, layer_choice.backend,
                         (linear_choice, decode_choice, experts_choice, norm_choice, layer_choice))
