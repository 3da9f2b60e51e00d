"""jaxspec: draft-guided LLM inference in JAX."""

from jaxspec.api import GenerationResult, InputError, Model, generate, load

__version__ = "0.1.0"
__all__ = ["GenerationResult", "InputError", "Model", "generate", "load"]
