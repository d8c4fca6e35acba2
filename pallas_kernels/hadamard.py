"""The indexer's Walsh–Hadamard transform (``numerics.hadamard``) in one launch.

Every butterfly stage rounds in f32 (as ds4 does), so the stages must run in their order: no
dense matmul. Fused by XLA into one loop, each stage reads its input twice and XLA recomputes
the earlier stages for every read: 15.2 µs for the indexer's q (64 heads × 128) and ~8 µs for
each compressor transform, on a few KB (NVIDIA H200, session 11's profile). Here a program
keeps a block of rows in registers through all stages. A stage views the row as
[n / 2s, 2, s]; the two halves of each pair come out by ``pick`` (Triton cannot slice a register
tile) and go back as (a + b, a − b): the reference's operations on the same values, so its bits
(except the sign of a zero made from two negative zeros: the masked sum starts from +0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import F32
from ds4jax.model.numerics import hadamard as reference
from pallas_kernels.common import pick

__all__ = ["hadamard", "reference", "supported", "transform"]

MAX_N = 256  # rows live in registers: [block_rows, n] f32


def supported(n: int) -> bool:
    return 2 <= n <= MAX_N and n & (n - 1) == 0


def transform(h: jax.Array) -> jax.Array:
    """The scaled transform of a register tile's rows h [R, n] (also the compressor-row kernel's)."""
    R, n = h.shape
    upper = lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1), 2) == 1
    s = 1
    while s < n:  # stride 1, 2, 4, ...: the reference's order
        h4 = h.reshape(R, n // (2 * s), 2, s)
        a = pick(h4, 2, 0)[:, :, None, :]
        b = pick(h4, 2, 1)[:, :, None, :]
        h = jnp.where(upper, a - b, a + b).reshape(R, n)
        s *= 2
    return h * F32(1.0 / np.sqrt(n))


def _kernel(x_ref, o_ref, *, n):
    o_ref[...] = transform(x_ref[...])  # [R, n]


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def hadamard(x: jax.Array, block_rows: int = 64, interpret: bool = False) -> jax.Array:
    """x [..., n] f32 → its scaled Walsh–Hadamard transform over the last axis, as ``reference``."""
    n = x.shape[-1]
    if not supported(n):
        raise ValueError(f"hadamard kernel: n = {n} is not a power of two in 2..{MAX_N}")
    M = math.prod(x.shape[:-1])
    # The rows per program divide M: no partial last block. On the H200 a partial block (15 rows
    # in blocks of 4) gave wrong values in row 0 in 2 of 7 shapes (session 12), cause not found;
    # the model's row counts (64 heads × tokens, the compressor's slots) need no partial block.
    R = math.gcd(block_rows, M & -M)  # a power of two dividing both
    y = pl.pallas_call(
        functools.partial(_kernel, n=n),
        grid=(pl.cdiv(M, R),),
        in_specs=[pl.BlockSpec((R, n), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((R, n), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((M, n), F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="hadamard",
    )(x.reshape(M, n).astype(F32))
    return y.reshape(x.shape)
