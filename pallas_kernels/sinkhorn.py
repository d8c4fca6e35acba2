"""The hyper-connection Sinkhorn (n_iter row/column normalisations of each token's n×n stream
mix) in one launch. XLA makes each of its ~40 short sums a kernel of its own, or a few dozen
fusions once the sums are elementwise chains; here a program normalises a block of tokens'
matrices in registers. It runs ``ds4jax.model.sinkhorn.sinkhorn`` itself, with the kernel's
rounding barrier (``opaque``) and register picks (``pick``): the same arithmetic, so the same
bits as the XLA path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.sinkhorn import sinkhorn as reference
from pallas_kernels.common import F32, kernel_zero, opaque, pick, pow2_at_least

__all__ = ["reference", "sinkhorn", "supported"]


def supported(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0  # the tile [tokens, n*n] must be a power of two wide


# How the kernel sums a row or column: "reduce", the reference's own double-float reduction
# (``lax.reduce``, one Triton reduction: ``common._lower_variadic_reduce``), or "chain", an unrolled
# TwoSum chain of register picks. Offline (pip Triton, sm_90): 2,240 against 3,280 instructions.
SUMS = "reduce"


def _kernel(z_ref, c_ref, o_ref, *, n, n_iter, hc_eps, sums):
    rnd = functools.partial(opaque, zero=z_ref[0])
    c = c_ref[...].reshape(-1, n, n)
    take = pick if sums == "chain" else None
    o_ref[...] = reference(c, n_iter, hc_eps, rnd=rnd, take=take).reshape(-1, n * n)


@functools.partial(jax.jit, static_argnames=("n_iter", "hc_eps", "block_tokens", "sums", "interpret"))
def sinkhorn(c, n_iter: int, hc_eps: float, block_tokens: int = 16, sums: str = SUMS, interpret: bool = False):
    """c [..., n, n] f32 logits → the Sinkhorn-normalised mix, as ``reference``."""
    lead, n = c.shape[:-2], c.shape[-1]
    T = math.prod(lead)
    TB = min(block_tokens, pow2_at_least(T))
    Tp = -(-T // TB) * TB
    x = jnp.pad(c.reshape(T, n * n).astype(F32), ((0, Tp - T), (0, 0)))  # padded rows: zeros, harmless
    y = pl.pallas_call(
        functools.partial(_kernel, n=n, n_iter=n_iter, hc_eps=hc_eps, sums=sums),
        grid=(Tp // TB,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((TB, n * n), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((TB, n * n), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Tp, n * n), F32),
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="hc_sinkhorn",
    )(kernel_zero(x, interpret), x)
    return y[:T].reshape(*lead, n, n)
