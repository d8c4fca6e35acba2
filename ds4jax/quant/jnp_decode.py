"""jnp dequantization of ``QTensor`` planes (jit-able; shapes are static).

``dequantize(qt)`` gives ``float32 [*shape]`` (int32 for I32). It matches
``numpy_codec.decode`` bit-for-bit even where XLA fuses ``d*q - m`` into an FMA,
because the products are exact in float32 (see ``numpy_codec``).

``dequantize_rows(qt, idx)`` gathers ``idx`` (int array, any shape) over the leading
axis of every plane first, so only the selected rows / experts are decoded; the result
has shape ``idx.shape + qt.shape[1:]``. ``take(qt, idx)`` is the gather alone (a
smaller QTensor, e.g. for a kernel that decodes on the fly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ds4jax.quant.formats import QType
from ds4jax.quant.layouts import IQ2_NIB, dequantize_iq2, iq2_nib_ints, iq2_xxs_ints
from ds4jax.quant.planes import QTensor

_F32 = jnp.float32


def _deq_q8_0(p: dict, shape: tuple[int, ...]) -> jax.Array:
    qs = p["qs"].reshape(shape[:-1] + (shape[-1] // 32, 32)).astype(_F32)
    return (qs * p["d"].astype(_F32)[..., None]).reshape(shape)


def _deq_q2_k(p: dict, shape: tuple[int, ...]) -> jax.Array:
    qs, sc = p["qs"], p["sc"]
    lead = qs.shape[:-1]  # (*lead, nb)
    shift = jnp.array([0, 2, 4, 6], jnp.uint8).reshape(4, 1)
    # [.., nb, half, 1, 32] >> [4, 1] -> [.., nb, half, crumb, 32] = element order;
    # regrouped by 16 this is the sub-block order of ``sc``.
    q = ((qs.reshape(lead + (2, 1, 32)) >> shift) & 3).reshape(lead + (16, 16)).astype(_F32)
    dl = p["d"].astype(_F32)[..., None] * (sc & 15).astype(_F32)
    ml = p["dmin"].astype(_F32)[..., None] * (sc >> 4).astype(_F32)
    return (dl[..., None] * q - ml[..., None]).reshape(shape)


def _deq_q4_k(p: dict, shape: tuple[int, ...]) -> jax.Array:
    qs = p["qs"]
    lead = qs.shape[:-1]
    shift = jnp.array([0, 4], jnp.uint8).reshape(2, 1)
    q = ((qs.reshape(lead + (4, 1, 32)) >> shift) & 15).reshape(lead + (8, 32)).astype(_F32)
    dl = p["d"].astype(_F32)[..., None] * p["sc"].astype(_F32)
    ml = p["dmin"].astype(_F32)[..., None] * p["m"].astype(_F32)
    return (dl[..., None] * q - ml[..., None]).reshape(shape)


def _deq_iq2_xxs(p: dict, shape: tuple[int, ...]) -> jax.Array:
    return dequantize_iq2(*iq2_xxs_ints(p), p["d"], shape)


_DEQ = {
    QType.Q8_0: _deq_q8_0,
    QType.Q2_K: _deq_q2_k,
    QType.Q4_K: _deq_q4_k,
    QType.IQ2_XXS: _deq_iq2_xxs,
}


def dequantize(qt: QTensor) -> jax.Array:
    """All of ``qt`` as ``float32 [*qt.shape]`` (``int32`` for I32)."""
    p = {k: jnp.asarray(v) for k, v in qt.planes.items()}
    if qt.qtype == IQ2_NIB:  # a load-time layout (quant/layouts.py), not a GGML type
        return dequantize_iq2(*iq2_nib_ints(p), p["d"], tuple(qt.shape))
    q = QType(qt.qtype)
    if q == QType.I32:
        return p["w"].astype(jnp.int32)
    if "w" in p:
        return p["w"].astype(_F32)
    return _DEQ[q](p, tuple(qt.shape))


def take(qt: QTensor, idx) -> QTensor:
    """The rows ``idx`` (int array, any shape) of ``qt``'s leading axis, as a QTensor."""
    if len(qt.shape) < 2:
        raise ValueError("take needs a tensor with a leading axis to index")
    idx = jnp.asarray(idx)
    planes = {k: jnp.take(jnp.asarray(v), idx, axis=0) for k, v in qt.planes.items()}
    return QTensor(qt.qtype, tuple(np.shape(idx)) + tuple(qt.shape[1:]), planes)


def dequantize_rows(qt: QTensor, idx) -> jax.Array:
    """``dequantize(qt)[idx]`` reading only the selected rows / experts."""
    return dequantize(take(qt, idx))
