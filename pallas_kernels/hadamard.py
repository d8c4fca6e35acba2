"""The indexer's Walsh–Hadamard transform (``numerics.hadamard``) in one launch.

Every butterfly stage rounds in f32 (as ds4 does), so the stages must run in their order: no
dense matmul. Fused by XLA into one loop, each stage reads its input twice and XLA recomputes
the earlier stages for every read: 15.2 µs for the indexer's q (64 heads × 128) and ~8 µs for
each compressor transform, on a few KB (NVIDIA H200, session 11's profile). Here a program
keeps a block of rows in registers through all stages. A stage views the row as
[n / 2s, 2, s]; the two halves of each pair come out by ``pick`` (Triton cannot slice a register
tile) and go back as (a + b, a − b): the reference's operations on the same values, so its bits
(except the sign of a zero made from two negative zeros: the masked sum starts from +0).

``rope_hadamard_fp4`` is the indexer's whole query chain in one launch: the tail RoPE, the
transform and the FP4 round trip (``indexer.select_rows``), where XLA ran the rotation and the
round trip as ~4 kernels around the transform's launch (H200, session 28: the round trip alone
84.9 µs and 63 kernels a 43-layer step).
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

from ds4jax.model.numerics import F32, fp4_e2m1_round_trip
from ds4jax.model.numerics import hadamard as reference
from pallas_kernels.common import kernel_zero, opaque, pick
from pallas_kernels.norms import rotate_tail_slice

__all__ = ["hadamard", "reference", "rope_hadamard_fp4", "rope_supported", "supported", "transform"]

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


# Rows a program of ``rope_hadamard_fp4`` (the launch's default; dispatch reads it at trace time).
# H200, session 29: at 64 rows (one program for a token's 64 heads) the launch cost ~33 µs more a
# ratio-4 layer than XLA's chain (+687 µs a 43-layer step, call B); 8 layers, one process (call C):
# 1 / 2 / 4 / 16 rows 2,003.8 / 2,001.2 / 2,008.7 / 2,013.7 µs of kernels a step against 2,054.3
# without the launch; 43 layers at 2 rows (call D): 10,386.9 against 10,718.5 µs, 105 kernels fewer.
ROPE_BLOCK_ROWS = 2


def rope_supported(x: jax.Array, cos: jax.Array, block: int) -> bool:
    """x [T, H, n] with cos [T, P] (the tail's pairs inside the row) and FP4 blocks dividing n."""
    return (
        x.ndim == 3
        and supported(x.shape[-1])
        and cos.shape[0] == x.shape[0]
        and 0 < 2 * cos.shape[-1] <= x.shape[-1]
        and x.shape[-1] % block == 0
    )


def _rope_kernel(z_ref, x_ref, cos_ref, sin_ref, o_ref, *, heads, n_pairs, block):
    rnd = functools.partial(opaque, zero=z_ref[0])
    y = x_ref[...]  # [R, n]: rows (token, head) of the program
    R, n = y.shape
    token = (pl.program_id(0) * R + lax.broadcasted_iota(jnp.int32, (R, 1), 0)) // heads
    y = rotate_tail_slice(y, cos_ref, sin_ref, token, 0, n, n_pairs, rnd)
    o_ref[...] = fp4_e2m1_round_trip(transform(y), block, rnd)


@functools.partial(jax.jit, static_argnames=("block", "block_rows", "interpret"))
def rope_hadamard_fp4(x, cos, sin, block: int, block_rows: int = ROPE_BLOCK_ROWS, interpret: bool = False):
    """x [T, H, n] f32, cos/sin [T, P] → ``fp4_e2m1_round_trip(reference(apply_rope_tail(x, cos,
    sin)), block)`` (the tail RoPE of each token's heads by its angles), as one launch."""
    T, H, n = x.shape
    M, P = T * H, cos.shape[-1]
    R = math.gcd(block_rows, M & -M)  # no partial last block (``hadamard``)
    flat = pl.BlockSpec((T * P,), lambda i: (0,))
    y = pl.pallas_call(
        functools.partial(_rope_kernel, heads=H, n_pairs=P, block=block),
        grid=(M // R,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((R, n), lambda i: (i, 0)), flat, flat],
        out_specs=pl.BlockSpec((R, n), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((M, n), F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rope_hadamard_fp4",
    )(kernel_zero(x, interpret), x.reshape(M, n).astype(F32), cos.reshape(-1).astype(F32), sin.reshape(-1).astype(F32))
    return y.reshape(x.shape)
