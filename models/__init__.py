"""Flax model family (installed as ``jaxspec.models``)."""

from .config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig, RopeScaling
from .transformer import AttnCapture, forward, init_params, param_shapes

__all__ = ["AttnCapture", "SUPPORTED_MODEL_TYPES", "ConfigError", "ModelConfig", "RopeScaling", "forward", "init_params", "param_shapes"]
