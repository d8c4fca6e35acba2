"""Quantized tensor formats: GGUF block codecs (NumPy) and load-time "planes" (JAX).

- ``formats``: ``QType`` ids / block geometry, ``row_nbytes``, ``tensor_nbytes``.
- ``numpy_codec.decode`` (exported as ``decode_numpy``): raw GGUF bytes -> float32.
- ``encode``: float32 -> raw GGUF bytes (test/synthetic model writer).
- ``planes``: ``QTensor`` pytree, ``pack`` (GGUF bytes -> planes) / ``unpack``.
- ``jnp_decode``: ``dequantize`` / ``dequantize_rows`` / ``take`` on planes, jit-able.
"""

from ds4jax.quant.encode import encode
from ds4jax.quant.formats import QType, as_qtype, qtype_from_id, row_nbytes, tensor_nbytes
from ds4jax.quant.jnp_decode import dequantize, dequantize_rows, take
from ds4jax.quant.numpy_codec import decode as decode_numpy
from ds4jax.quant.planes import QTensor, pack, unpack

__all__ = [
    "QTensor",
    "QType",
    "as_qtype",
    "decode_numpy",
    "dequantize",
    "dequantize_rows",
    "encode",
    "pack",
    "qtype_from_id",
    "row_nbytes",
    "take",
    "tensor_nbytes",
    "unpack",
]
