"""The CustomLLM architecture: config, layers, paged latent cache and checkpoint loading."""

from model.backends import ModelBackends, select_backends
from model.config import ModelConfig
from model.kv_cache import PagedLatentCache
from model.loader import CheckpointError, load_checkpoint, load_model
from model.metadata import AttentionMetadata
from model.model import CustomLLM

__all__ = ["AttentionMetadata", "CheckpointError", "CustomLLM", "ModelBackends", "ModelConfig", "PagedLatentCache",
           "load_checkpoint", "load_model", "select_backends"]
