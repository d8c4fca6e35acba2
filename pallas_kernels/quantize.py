"""The activations' int8 quantization before the Q8_0 and expert kernels, as one launch.

XLA runs ``numerics.quantize_q8_0`` as three kernels (the blocks' max |x|, then the scale and its
reciprocal with their residual corrections, then the rounding to int8; H200, session 22: ~1.1-1.3 µs
each, three a projection, seven projections a layer) and ``quantize_q8_k`` likewise. Here the same
functions run on register tiles, a program a (row, chunk of blocks): one launch, the same bits
(``in_kernel``: the round by adding 1.5·2^23, the max element by a masked sum).

Quantizing inside each matmul program instead (``dispatch.QUANTIZE_IN_KERNEL``) repeats the whole
row's quantization in every program of the matmul: 2.2-4.2 µs a call more (session 12).

``swiglu_quantize``: an FFN's middle in one launch, from its gate+up launch's K-split partials to
the down projection's int8 blocks (``finish``, ``numerics.swiglu``, the routed experts' router
weight, ``quantize_q8_0`` or ``quantize_q8_k``). For the shared expert XLA ran these as four kernels
a layer (the partials' sums with the SwiGLU, then the quantization: 214 µs and 172 kernels a
43-layer step, H200, session 28); for the routed experts as two fusions and the quantize launch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import quantize_q8_0, quantize_q8_k, swiglu
from pallas_kernels.common import F32, as_split_sums, finished, is_pow2, kernel_zero, opaque

__all__ = ["KINDS", "quantize", "supported", "swiglu_quantize", "swiglu_supported"]

# kind -> (numerics' function, its block): this launch's, and the norms' (``norms.rms_norm_quant``)
KINDS = {"q8_0": (quantize_q8_0, 32), "q8_k": (quantize_q8_k, 256)}
CHUNK = 1024  # elements a program: 32 Q8_0 or 4 Q8_K blocks
WARPS = 4


def _chunk(kind: str, K: int, chunk: int) -> int:
    return max(min(chunk, K), KINDS[kind][1])  # whole blocks of the kind a program


def supported(x, kind: str, chunk: int = CHUNK) -> bool:
    """x [n, K] (an array, or a matmul launch's ``SplitSums``) with K a power of two of at least
    one block; a ``SplitSums`` starting at whole chunks of its launch's columns."""
    K = x.shape[-1]
    if x.ndim != 2 or K < KINDS[kind][1] or not is_pow2(K):
        return False
    return as_split_sums(x).start % _chunk(kind, K, chunk) == 0


def _sums_specs(s, c: int) -> list:
    """Block specs of a ``SplitSums``' arrays for programs (row t, chunk j of c columns): each reads
    its [S, 1, c] block of every split, at the chunk's place in the launch's columns."""
    S, b = s.arrays[0].shape[0], s.start // c
    return [pl.BlockSpec((S, 1, c), lambda t, j: (0, t, b + j))] * len(s.arrays)


def _kernel(z_ref, *refs, kind):
    rnd = functools.partial(opaque, zero=z_ref[0])
    x_refs, (q_ref, d_ref) = refs[:-2], refs[-2:]
    # each [S, 1, c] block: the split partials added in split order, as ``finish`` (or [1, 1, c]: the rows)
    q, d = KINDS[kind][0](finished(x_refs), rnd, in_kernel=True)
    q_ref[...] = q
    d_ref[...] = d


@functools.partial(jax.jit, static_argnames=("kind", "chunk", "warps", "interpret"))
def quantize(x, kind: str, chunk: int = CHUNK, warps: int = WARPS, interpret: bool = False):
    """x [n, K] → (q int8 [n, K], d f32 [n, K/block]) as ``numerics.quantize_q8_0`` (``kind``
    "q8_0") or ``quantize_q8_k`` ("q8_k"). x: f32 rows, or a matmul launch's unfinished outputs
    (``SplitSums``), added here as ``finish`` adds them: the bits of quantizing the finished rows,
    without XLA's finish kernel between the two launches. ``chunk``, ``warps``: the launch (they
    only time)."""
    xs = as_split_sums(x)
    n, K = xs.shape
    blk = KINDS[kind][1]
    c = _chunk(kind, K, chunk)
    arrays = [a.astype(F32) for a in xs.arrays]
    return pl.pallas_call(
        functools.partial(_kernel, kind=kind),
        grid=(n, K // c),
        in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), *_sums_specs(xs, c)],
        out_specs=[pl.BlockSpec((1, c), lambda t, j: (t, j)), pl.BlockSpec((1, c // blk), lambda t, j: (t, j))],
        out_shape=[jax.ShapeDtypeStruct((n, K), jnp.int8), jax.ShapeDtypeStruct((n, K // blk), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=f"quantize_{kind}",
    )(kernel_zero(arrays[0], interpret), *arrays)


SWIGLU_CHUNK = 256  # elements a program: 8 Q8_0 blocks or one Q8_K (the shared expert's 2048: 8 programs a token)
# the dispatch's launches (they only time): the shared expert's (Q8_0), the routed experts' (Q8_K)
SWIGLU_WARPS = WARPS
ROUTED_SWIGLU_WARPS = WARPS


def swiglu_supported(g, u, chunk: int = SWIGLU_CHUNK, kind: str = "q8_0") -> bool:
    """g and u [n, w] (arrays or ``SplitSums``) with w a power of two of at least one block of
    ``kind``, each starting at whole chunks of its launch's columns."""
    return g.shape == u.shape and supported(g, kind, chunk) and supported(u, kind, chunk)


def _swiglu_kernel(z_ref, *refs, forms, clamp, kind, weighted):
    rnd = functools.partial(opaque, zero=z_ref[0])
    fg, fu = forms
    g_refs, u_refs, rest = refs[:fg], refs[fg : fg + fu], refs[fg + fu :]
    # each [S, 1, c] (or [1, 1, c]) block: the split partials added in split order, as ``finish``
    mid = swiglu(finished(g_refs), finished(u_refs), clamp, rnd)  # [1, c]
    if weighted:  # the routed expert's router weight, one f32 product as the XLA path's
        mid = mid * rest[0][...]
        rest = rest[1:]
    q_ref, d_ref = rest
    q, d = KINDS[kind][0](mid, rnd, in_kernel=True)
    q_ref[...] = q
    d_ref[...] = d


@functools.partial(jax.jit, static_argnames=("clamp", "kind", "chunk", "warps", "interpret"))
def swiglu_quantize(
    g,
    u,
    clamp: float,
    weights=None,
    kind: str = "q8_0",
    chunk: int = SWIGLU_CHUNK,
    warps: int = WARPS,
    interpret: bool = False,
):
    """The ``kind`` quantization ("q8_0" or "q8_k") of ``swiglu(g, u, clamp)`` (times ``weights``
    [n], a factor a row, where given) of g, u [n, w]: f32 arrays, or a matmul launch's unfinished
    outputs (``SplitSums``, added here as ``finish`` adds them) → (q int8 [n, w], d f32 [n, w/block]),
    the same bits. ``chunk``, ``warps``: the launch (they only time)."""
    gs, us = as_split_sums(g), as_split_sums(u)
    n, w = g.shape
    c, blk = _chunk(kind, w, chunk), KINDS[kind][1]
    in_specs, args = [pl.BlockSpec((1,), lambda *_: (0,))], []
    for s in (gs, us):
        in_specs += _sums_specs(s, c)
        args += list(s.arrays)
    if weights is not None:
        in_specs.append(pl.BlockSpec((1, 1), lambda t, j: (t, 0)))
        args.append(weights.astype(F32).reshape(n, 1))
    return pl.pallas_call(
        functools.partial(
            _swiglu_kernel,
            forms=(len(gs.arrays), len(us.arrays)),
            clamp=float(clamp),
            kind=kind,
            weighted=weights is not None,
        ),
        grid=(n, w // c),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((1, c), lambda t, j: (t, j)), pl.BlockSpec((1, c // blk), lambda t, j: (t, j))],
        out_shape=[jax.ShapeDtypeStruct((n, w), jnp.int8), jax.ShapeDtypeStruct((n, w // blk), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=f"swiglu_quantize_{kind}",
    )(kernel_zero(args[0], interpret), *args)
