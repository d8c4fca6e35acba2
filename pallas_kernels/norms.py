"""Fused RMS norms for the attention input side (decode and the verifier).

* ``rms_norm_pair``: the Q_A and KV_A low-rank outputs of a token normalised (with their own
  weights) in one launch instead of two chains of XLA fusions.
* ``head_norm_rope``: per-head weightless RMS norm of Q, then the tail RoPE rotation of the
  last n_rot dims, in one launch; the rotation reads the normalised values as the
  sequential path stores them (rounded products), so the result is the same bits.

Numerics are ``ds4jax.model.numerics.rms_norm`` exactly: Σx² from three exact split
products summed in double-float (``sum_squares``), mean by a power of two, correctly
rounded sqrt and division (residual corrections), then x·scale·w. ``*_reference`` are the
model's jnp functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import dd_total, div, rms_norm, split12, sqrt
from ds4jax.model.rope import apply_rope_tail
from pallas_kernels.common import F32, is_pow2, kernel_zero, opaque, pick, two_sum_add


def add_squares(s, e, x):
    """(s, e) += x² per lane, as ``numerics.sum_squares``: three exact split products."""
    hi, lo = split12(x)
    s, e = two_sum_add(s, e, hi * hi)
    s, e = two_sum_add(s, e, 2.0 * hi * lo)
    return two_sum_add(s, e, lo * lo)


def scale_from_squares(s, e, n: int, eps, zero):
    """1/sqrt(Σx²/n + eps) from per-lane double-float sums of squares (s, e) [..., lanes]."""
    ms = dd_total(s, e) * F32(1.0 / n)  # a power of two: exact
    rnd = functools.partial(opaque, zero=zero)  # numerics' barrier cannot live inside a kernel
    return div(jnp.ones_like(ms), sqrt(ms + F32(eps), rnd), rnd)


def _rms_scale(x, eps, zero):
    """1/sqrt(mean(x²) + eps) per row of x [R, n] (keepdims)."""
    z = jnp.zeros_like(x)
    return scale_from_squares(*add_squares(z, z, x), x.shape[-1], eps, zero)[:, None]


# ---- pair-fused norm -------------------------------------------------------------------------
def rms_norm_pair_reference(a, wa, b, wb, eps: float):
    return rms_norm(a, wa, eps), rms_norm(b, wb, eps)


def _pair_kernel(z_ref, a_ref, wa_ref, b_ref, wb_ref, ao_ref, bo_ref, *, eps):
    zero = z_ref[0]
    for x_ref, w_ref, o_ref in ((a_ref, wa_ref, ao_ref), (b_ref, wb_ref, bo_ref)):
        x = x_ref[...].astype(F32)  # [1, n]
        o_ref[...] = (x * _rms_scale(x, eps, zero)) * w_ref[...].astype(F32)[None, :]


def pair_supported(a, b) -> bool:
    return is_pow2(a.shape[-1]) and is_pow2(b.shape[-1])


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm_pair(a, wa, b, wb, eps: float, interpret: bool = False):
    """a [T, n1], b [T, n2] (powers of two) with weights wa [n1], wb [n2] → both normalised."""
    T, n1 = a.shape
    n2 = b.shape[1]
    row = lambda n: pl.BlockSpec((1, n), lambda t: (t, 0))
    vec = lambda n: pl.BlockSpec((n,), lambda t: (0,))
    return pl.pallas_call(
        functools.partial(_pair_kernel, eps=eps),
        grid=(T,),
        in_specs=[pl.BlockSpec((1,), lambda t: (0,)), row(n1), vec(n1), row(n2), vec(n2)],
        out_specs=[row(n1), row(n2)],
        out_shape=[jax.ShapeDtypeStruct(a.shape, F32), jax.ShapeDtypeStruct(b.shape, F32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rms_norm_pair",
    )(kernel_zero(a, interpret), a, wa, b, wb)


# ---- head norm + tail RoPE ---------------------------------------------------------------------
def head_norm_rope_reference(q, cos, sin, eps: float):
    """q [T, H, hd]; cos/sin [T, n_rot/2]."""
    return apply_rope_tail(rms_norm(q, None, eps), cos[:, None, :], sin[:, None, :])


def _head_kernel(z_ref, q_ref, c_ref, s_ref, o_ref, *, eps, n_pairs):
    zero = z_ref[0]
    x = q_ref[...].astype(F32)  # [HB, hd]
    HB, hd = x.shape
    y = x * _rms_scale(x, eps, zero)  # the normalised values, as stored by the sequential path
    y3 = y.reshape(HB, hd // 2, 2)
    y0, y1 = pick(y3, 2, 0), pick(y3, 2, 1)  # [HB, hd/2] pair members
    c = c_ref[...][None, :]  # [1, hd/2]: cos for the tail pairs, 1 elsewhere (unused there)
    s = s_ref[...][None, :]
    r0 = opaque(y0 * c, zero) - opaque(y1 * s, zero)
    r1 = opaque(y0 * s, zero) + opaque(y1 * c, zero)
    tail = jax.lax.broadcasted_iota(jnp.int32, (1, hd // 2), 1) >= hd // 2 - n_pairs
    r0, r1 = jnp.where(tail, r0, y0), jnp.where(tail, r1, y1)
    which = jax.lax.broadcasted_iota(jnp.int32, (HB, hd // 2, 2), 2)
    o_ref[...] = jnp.where(which == 0, r0[:, :, None], r1[:, :, None]).reshape(HB, hd)


def head_supported(q, cos) -> bool:
    return is_pow2(q.shape[-1]) and is_pow2(q.shape[-2])


@functools.partial(jax.jit, static_argnames=("eps", "heads_per_program", "interpret"))
def head_norm_rope(q, cos, sin, eps: float, heads_per_program: int = 16, interpret: bool = False):
    """q [T, H, hd] (powers of two), cos/sin [T, n_rot/2] → normalised, tail-rotated q."""
    T, H, hd = q.shape
    P = cos.shape[-1]
    HB = min(heads_per_program, H)
    pad = lambda a, v: jnp.concatenate([jnp.full((T, hd // 2 - P), v, F32), a.astype(F32)], axis=1)
    return pl.pallas_call(
        functools.partial(_head_kernel, eps=eps, n_pairs=P),
        grid=(T, H // HB),
        in_specs=[
            pl.BlockSpec((1,), lambda t, h: (0,)),
            pl.BlockSpec((None, HB, hd), lambda t, h: (t, h, 0)),
            pl.BlockSpec((None, hd // 2), lambda t, h: (t, 0)),
            pl.BlockSpec((None, hd // 2), lambda t, h: (t, 0)),
        ],
        out_specs=pl.BlockSpec((None, HB, hd), lambda t, h: (t, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, F32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="head_norm_rope",
    )(kernel_zero(q, interpret), q, pad(cos, 1.0), pad(sin, 0.0))
