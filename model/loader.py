"""Checkpoint loading: original parameter names, strict checks, dtype conversion, or seeded random weights.

Accepted: a `.safetensors` file, a `.bin`/`.pt`/`.pth` file (torch.load with weights_only=True), a directory
holding one of those (sharded safetensors or .bin with an index json too) and optionally `config.json`, or
a training output directory whose newest `checkpoint-N/` holds them, or the tensors themselves (a mapping).
Tensors are copied one at a time into a model allocated once in the target dtype, so loading never holds two
copies of the weights. `load_model` picks the backends first, loads, then has each module process its weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model.backends import ModelBackends, select_backends
from model.config import _ALIASES, ModelConfig
from model.model import CustomLLM

logger = logging.getLogger(__name__)

# Derived rotary buffers the training code saved; recomputed here, so ignored.
_DERIVED = re.compile(r"\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
# Wrappers the training code may leave on every name (DDP, torch.compile, a `model.` holder).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Files in a training checkpoint directory that are not the weights.
_NOT_WEIGHTS = {"optimizer.pt", "optimizer.bin", "scheduler.pt", "training_args.bin", "rng_state.pth"}
_HEAD_DIM = 64  # used only to infer the head count when no config.json gives it
_INIT_BLOCK = 1 << 22  # values per independently seeded block of random init


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with a message naming the file or tensor."""


class TensorSource:
    """Name -> shape of every tensor in a checkpoint, and lazy access to each tensor."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor]) -> None:
        self.shapes = shapes
        self._read = read

    def read(self, name: str) -> torch.Tensor:
        return self._read(name)


def _safetensors_source(files: list[Path]) -> TensorSource:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    where[name] = file
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read safetensors file {file}: {exc}") from exc

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    return TensorSource(shapes, read)


def _unwrap_state_dict(obj: object, file: Path) -> dict[str, torch.Tensor]:
    """A training script may save {'model': sd} or {'state_dict': sd}; return the tensor dict."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return obj


def _torch_source(files: list[Path]) -> TensorSource:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            # mmap keeps the file on disk until each tensor is copied; old (non-zip) files can't be mapped.
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {file}: {exc}") from exc
        except Exception as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        tensors.update(_unwrap_state_dict(obj, file))
    return TensorSource({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)


def _sharded_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
    files = sorted({index.parent / name for name in weight_map.values()})
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} listed in {index} is missing")
    return files


def _latest_training_checkpoint(directory: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return max(steps)[1] if steps else None


def find_weights(path: Path) -> tuple[TensorSource, Path | None]:
    """The checkpoint's tensors and its config.json (None when absent)."""
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return _safetensors_source([path]), None
        if path.suffix in (".bin", ".pt", ".pth"):
            return _torch_source([path]), None
        if path.name.endswith(".index.json"):
            files = _sharded_files(path)
            source = _safetensors_source if files[0].suffix == ".safetensors" else _torch_source
            return source(files), _config_in(path.parent)
        raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin, .pt or .pth)")

    candidates: list[tuple[str, Callable[[], TensorSource]]] = [
        ("model.safetensors.index.json",
         lambda: _safetensors_source(_sharded_files(path / "model.safetensors.index.json"))),
        ("model.safetensors", lambda: _safetensors_source([path / "model.safetensors"])),
        ("pytorch_model.bin.index.json", lambda: _torch_source(_sharded_files(path / "pytorch_model.bin.index.json"))),
        ("pytorch_model.bin", lambda: _torch_source([path / "pytorch_model.bin"])),
    ]
    for name, make in candidates:
        if (path / name).is_file():
            return make(), _config_in(path)
    others = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".pth", ".bin")
                    and p.name not in _NOT_WEIGHTS and p.is_file())
    if len(others) == 1:
        source = _safetensors_source if others[0].suffix == ".safetensors" else _torch_source
        return source(others), _config_in(path)
    if len(others) > 1:
        raise CheckpointError(f"{path} holds several weight files ({', '.join(p.name for p in others)}); "
                              "name one, or add an index json")
    latest = _latest_training_checkpoint(path)
    if latest is not None:
        logger.info("loading the newest training checkpoint %s", latest)
        return find_weights(latest)
    raise CheckpointError(f"no weights found in {path} (expected model.safetensors, pytorch_model.bin, "
                          "a *.pt file or checkpoint-N/ directories)")


def _config_in(directory: Path) -> Path | None:
    config = directory / "config.json"
    return config if config.is_file() else None


def normalise_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Checkpoint name -> model name, dropping derived rotary buffers and wrapper prefixes."""
    names = [n for n in shapes if not _DERIVED.search(n)]
    for prefix in _WRAPPER_PREFIXES:
        if names and all(n.startswith(prefix) for n in names):
            return {n: n[len(prefix):] for n in names}
    return {n: n for n in names}


def infer_config(shapes: dict[str, tuple[int, ...]], overrides: dict[str, object]) -> ModelConfig:
    """Sizes from tensor shapes; fields present in `overrides` (a config.json) win."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"missing tensor {name}: cannot infer the model's sizes without it")
        return shapes[name]

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for n in shapes if (m := re.match(pattern, n))}
        return max(found) + 1 if found else 0

    vocab_size, hidden_size = shape("token_embeddings.weight")
    layer = "decoder_layers.0"
    moe = f"{layer}.mlp.moe"
    num_shared = count(rf"{moe}\.shared_experts\.(\d+)\.")
    num_routed = count(rf"{moe}\.routed_experts\.(\d+)\.")
    inferred: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": count(r"decoder_layers\.(\d+)\."),
        "latent_dim": shape(f"{layer}.self_attn.kv_proj_d.weight")[0],
        "intermediate_size": shape(f"{moe}.shared_experts.0.gate_proj.weight")[0],
        "num_experts": num_shared + num_routed,
        "num_shared_experts": num_shared,
        "max_position_embeddings": shape("position_embeddings.weight")[0],
    }
    # Head count leaves no trace in the shapes (every projection is hidden-wide); assume the seed's head_dim.
    if "num_attention_heads" not in overrides:
        if hidden_size % _HEAD_DIM:
            raise CheckpointError(f"cannot infer num_attention_heads for hidden_size={hidden_size}: "
                                  "add a config.json that gives it")
        inferred["num_attention_heads"] = hidden_size // _HEAD_DIM
    if "top_k_experts" not in overrides:
        inferred["top_k_experts"] = min(ModelConfig.top_k_experts, max(num_routed, 1))
    merged = {**inferred, **overrides}
    try:
        return ModelConfig.from_dict(merged)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid model config: {exc}") from exc


def check_names_and_shapes(model: CustomLLM, shapes: dict[str, tuple[int, ...]], names: dict[str, str]) -> None:
    """Strict: every model tensor present with its shape, nothing unexpected."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {names[n]: shapes[n] for n in names}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = [f"missing tensor {n} (expected shape {list(expected[n])})" for n in missing[:10]]
    problems += [f"unexpected tensor {n} (shape {list(found[n])})" for n in unexpected[:10]]
    problems += [f"tensor {n}: expected shape {list(expected[n])}, found {list(found[n])}"
                 for n in sorted(set(expected) & set(found)) if expected[n] != found[n]][:10]
    if problems:
        more = len(missing) + len(unexpected) - min(len(missing), 10) - min(len(unexpected), 10)
        tail = f" (and {more} more)" if more > 0 else ""
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems) + tail)


def allocate_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> CustomLLM:
    """An uninitialised model directly in the target dtype and device (no float32 copy on the way)."""
    with torch.device("meta"):
        model = CustomLLM(config)
    return model.to(dtype).to_empty(device=device).eval()


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_random_weights(model: CustomLLM, seed: int) -> None:
    """Deterministic random weights (NOT a trained model): N(0, 0.02) matrices, unit norms, zero biases.

    Each block of rows is drawn on the CPU in float32 from its own generator, seeded by (seed, tensor name,
    block), so the weights are the same on every device and dtype and the blocks can be drawn in parallel.
    """
    jobs: list[tuple[torch.Tensor, int]] = []  # (target rows, generator seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif tensor.dim() == 1:
                tensor.zero_()
            else:
                rows = max(1, _INIT_BLOCK // max(1, tensor[0].numel()))
                jobs += [(tensor[i:i + rows], _chunk_seed(seed, name, i // rows))
                         for i in range(0, tensor.shape[0], rows)]

    def draw(job: tuple[torch.Tensor, int]) -> None:
        target, chunk_seed = job
        values = torch.empty(target.shape).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(chunk_seed))
        with torch.no_grad():
            target.copy_(values)

    # torch releases the GIL inside normal_ and copy_, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(draw, jobs))


def _iter_sources(source: TensorSource, names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    for ckpt_name, model_name in names.items():
        yield model_name, source.read(ckpt_name)


def load_model(path: str | Path | Mapping[str, torch.Tensor] | None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", seed: int = 0, config: ModelConfig | None = None,
               backends: ModelBackends | None = None) -> CustomLLM:
    """The model ready to run: `backends` (default: "auto" for every op) chosen before loading, the checkpoint
    loaded (`load_checkpoint`), then each module's weights processed for its backend."""
    backends = backends or select_backends(device, dtype)
    model = load_checkpoint(path, dtype, device, seed, config)
    model.process_weights(backends)
    return model


def load_checkpoint(path: str | Path | Mapping[str, torch.Tensor] | None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", seed: int = 0,
                    config: ModelConfig | None = None) -> CustomLLM:
    """The model holding a checkpoint's tensors as they are (not processed: it does not run, its state_dict is
    the checkpoint's). `path` None: `config` (default: the seed model) with seeded random weights."""
    if path is None:
        model = allocate_model(config or ModelConfig(), dtype, device)
        init_random_weights(model, seed)
        return model

    if isinstance(path, Mapping):
        source, config_file = TensorSource({k: tuple(v.shape) for k, v in path.items()}, path.__getitem__), None
    else:
        source, config_file = find_weights(Path(path))
    names = normalise_names(source.shapes)
    shapes = {names[n]: source.shapes[n] for n in names}
    if config is None:
        overrides: dict[str, object] = {}
        if config_file is not None:
            try:
                raw = json.loads(config_file.read_text())
                base = ModelConfig.from_dict(raw)
            except (OSError, ValueError, TypeError) as exc:
                raise CheckpointError(f"cannot use {config_file}: {exc}") from exc
            overrides = {k: v for k, v in base.to_dict().items() if _mentions(raw, k)}
        config = infer_config(shapes, overrides)
    model = allocate_model(config, dtype, device)
    check_names_and_shapes(model, source.shapes, names)
    targets = model.state_dict()  # views into the parameters: copying into them fills the model
    with torch.no_grad():
        for name, tensor in _iter_sources(source, names):
            targets[name].copy_(tensor.to(dtype))
    return model


def _mentions(raw: dict[str, object], field: str) -> bool:
    """Whether a raw config.json gives `field`, under our name or an alias of it."""
    return field in raw or any(_ALIASES.get(k) == field for k in raw) or (
        field == "num_experts" and "n_routed_experts" in raw)
