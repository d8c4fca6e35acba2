"""The activations' int8 quantization before the Q8_0 and expert kernels, as one launch.

XLA runs ``numerics.quantize_q8_0`` as three kernels (the blocks' max |x|, then the scale and its
reciprocal with their residual corrections, then the rounding to int8; H200, session 22: ~1.1-1.3 µs
each, three a projection, seven projections a layer) and ``quantize_q8_k`` likewise. Here the same
functions run on register tiles, a program a (row, chunk of blocks): one launch, the same bits
(``in_kernel``: the round by adding 1.5·2^23, the max element by a masked sum).

Quantizing inside each matmul program instead (``dispatch.QUANTIZE_IN_KERNEL``) repeats the whole
row's quantization in every program of the matmul: 2.2-4.2 µs a call more (session 12).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import quantize_q8_0, quantize_q8_k
from pallas_kernels.common import F32, is_pow2, kernel_zero, opaque

__all__ = ["KINDS", "quantize", "supported"]

# kind -> (numerics' function, its block): this launch's, and the norms' (``norms.rms_norm_quant``)
KINDS = {"q8_0": (quantize_q8_0, 32), "q8_k": (quantize_q8_k, 256)}
CHUNK = 1024  # elements a program: 32 Q8_0 or 4 Q8_K blocks
WARPS = 4


def supported(x: jax.Array, kind: str) -> bool:
    """x [n, K] with K a power of two of at least one block."""
    K = x.shape[-1]
    return x.ndim == 2 and K >= KINDS[kind][1] and is_pow2(K)


def _kernel(z_ref, x_ref, q_ref, d_ref, *, kind):
    rnd = functools.partial(opaque, zero=z_ref[0])
    q, d = KINDS[kind][0](x_ref[...], rnd, in_kernel=True)
    q_ref[...] = q
    d_ref[...] = d


@functools.partial(jax.jit, static_argnames=("kind", "chunk", "warps", "interpret"))
def quantize(x, kind: str, chunk: int = CHUNK, warps: int = WARPS, interpret: bool = False):
    """x [n, K] f32 → (q int8 [n, K], d f32 [n, K/block]) as ``numerics.quantize_q8_0`` (``kind``
    "q8_0") or ``quantize_q8_k`` ("q8_k"). ``chunk``, ``warps``: the launch (they only time)."""
    n, K = x.shape
    blk = KINDS[kind][1]
    c = max(min(chunk, K), blk)
    return pl.pallas_call(
        functools.partial(_kernel, kind=kind),
        grid=(n, K // c),
        in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), pl.BlockSpec((1, c), lambda t, j: (t, j))],
        out_specs=[pl.BlockSpec((1, c), lambda t, j: (t, j)), pl.BlockSpec((1, c // blk), lambda t, j: (t, j))],
        out_shape=[jax.ShapeDtypeStruct((n, K), jnp.int8), jax.ShapeDtypeStruct((n, K // blk), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=f"quantize_{kind}",
    )(kernel_zero(x, interpret), x.astype(F32))
