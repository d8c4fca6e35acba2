"""ds4jax: a JAX/XLA inference engine for DeepSeek V4 Flash GGUF files (ds4's layout)."""

from ds4jax.errors import DS4Error

__all__ = ["DS4Error"]
__version__ = "0.1.0"
