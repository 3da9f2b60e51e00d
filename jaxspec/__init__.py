"""jaxspec: draft-guided LLM inference in JAX."""

from jaxspec.api import GenerationResult, InputError, Model, generate, load
from jaxspec.sharding import ShardingRules, make_mesh

__version__ = "0.1.0"
__all__ = ["GenerationResult", "InputError", "Model", "ShardingRules", "generate", "load", "make_mesh"]
