"""Scalar numerics shared by the model: ds4's CPU-reference roundings and simulations.

Everything is float32 jnp, shape-polymorphic over leading dims. These functions
define *what* is computed; the matmuls that use the int8 activation blocks live
in ``linear.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
NEG_INF = -1e30  # ds4's "minus infinity" sentinel in masks and compressor state
NO_SCORE = NEG_INF / 2  # a compressor window whose max score is at or below this holds no real score


def round_to_grid(x: jax.Array, mant_bits: int, min_exp: int) -> jax.Array:
    """Round f32 x to a float format with ``mant_bits`` stored mantissa bits and smallest
    normal exponent ``min_exp`` (subnormals below), nearest-even; no overflow handling.

    Done with exact power-of-two scaling and rint, not dtype casts: XLA's GPU simplifier
    deletes f32->f16->f32 and f32->f8->f32 round trips (excess precision), and on CPU
    the f8 cast of a fused value is not guaranteed either.
    """
    _, e = jnp.frexp(x)  # |x| = m 2^e, m in [0.5, 1): the leading bit has weight 2^(e-1)
    q = jnp.maximum(e - 1, min_exp) - mant_bits  # exponent of one unit in the last place
    return jnp.ldexp(jnp.round(jnp.ldexp(x, -q)), q)


def total_order_key(x: jax.Array) -> jax.Array:
    """int32 keys whose signed order is the float total order of f32 ``x`` (−NaN < −inf < … <
    −0 < +0 < … < +inf < +NaN): the order ``lax.top_k`` sorts in."""
    bits = lax.bitcast_convert_type(x.astype(F32), jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def pow2(k: jax.Array) -> jax.Array:
    """2^k as f32 from its exponent bits, for integer k in [-126, 127]."""
    return lax.bitcast_convert_type(lax.shift_left(k.astype(jnp.int32) + 127, 23), F32)


def round_to_grid_bits(x: jax.Array, mant_bits: int, min_exp: int, rnd) -> jax.Array:
    """``round_to_grid`` inside a kernel (Triton has no frexp, ldexp or round): the exponent from
    x's bits, the scalings as products by powers of two (exact: every value here stays normal),
    the round by adding and removing 1.5·2^23, a zero keeping x's sign as ``jnp.round`` does. The
    same bits for every finite x whose results are normal; ``rnd``: the kernel's barrier."""
    biased = lax.shift_right_logical(lax.bitcast_convert_type(x, jnp.int32), 23) & 0xFF
    q = jnp.maximum(biased - 127, min_exp) - mant_bits  # frexp's e - 1 is biased - 127 (subnormals: min_exp)
    v = x * pow2(-q)
    r = rnd(rnd(v) + _ROUND_MAGIC) - _ROUND_MAGIC
    return jnp.where(r == 0, v * 0.0, r) * pow2(q)


def ceil_log2_bits(r: jax.Array) -> jax.Array:
    """``_ceil_log2`` of normal r > 0 from its bits (inside a kernel)."""
    b = lax.bitcast_convert_type(r, jnp.int32)
    biased = lax.shift_right_logical(b, 23) & 0xFF
    return jnp.where((b & 0x7FFFFF) == 0, biased - 127, biased - 126)  # a power of two keeps its exponent


def f16_round(x: jax.Array) -> jax.Array:
    """float32(float16(x)), round to nearest even: how ds4 stores cache rows (|x| < 65504)."""
    return round_to_grid(x.astype(F32), 10, -14)


def f16_round_bits(x: jax.Array, rnd) -> jax.Array:
    """``f16_round`` inside a kernel, as f16 (``round_to_grid_bits``; ``rnd``: the kernel's barrier)."""
    return round_to_grid_bits(x, 10, -14, rnd).astype(jnp.float16)


# ---- fused-multiply-add control ----------------------------------------------
def rounded(x: jax.Array) -> jax.Array:
    """x itself, but opaque to the compiler: forces an f32 rounding of a product here.

    XLA's CPU and GPU backends contract ``a*b + c`` into an FMA when the product is
    fused into a following add (e.g. a reduce). Whether that happens depends on
    fusion and vectorisation, so on the program's shapes. XOR-ing the bits with a
    zero the compiler cannot see makes the rounded product a value it must produce.
    Inside a while loop on XLA:CPU this was seen to lose one rounding (an FMA again): loop
    bodies use ``rounded_in_loop`` (the prefill's grouped expert reference is the one).
    """
    return _xor_bits(x, lax.optimization_barrier(jnp.zeros((), jnp.uint32)))


def _xor_bits(x: jax.Array, zero: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) ^ zero, x.dtype)


def rounded_in_loop(x: jax.Array) -> jax.Array:
    """``rounded`` for a loop body on XLA:CPU: the zero is tied to x through the barrier, so it
    cannot be hoisted out of the loop and folded (which let an FMA back in: the K-quant expert
    reference in ``lax.map`` lost last bits without this). It makes XLA materialise x, so the
    loop-free programs keep ``rounded``."""
    zero, x = lax.optimization_barrier((jnp.zeros((), jnp.uint32), x))
    return _xor_bits(x, zero)


def divide_by(x: jax.Array, c: float, rnd=rounded) -> jax.Array:
    """x / c correctly rounded for a literal c.

    XLA rewrites division by a constant into multiplication by the rounded reciprocal,
    off by an ulp for ~5% of inputs, which moves int8/FP8 codes on ties; ``div``'s
    correction step undoes that."""
    return div(x, jnp.full(x.shape, c, F32), rnd)


# ---- accurate sums ---------------------------------------------------------------
def dd_add(a, b):
    """(s1, e1) + (s2, e2) as double-floats: Knuth's TwoSum on the heads, errors added."""
    (s1, e1), (s2, e2) = a, b
    s = s1 + s2
    bb = s - s1
    err = (s1 - (s - bb)) + (s2 - bb)  # Knuth's TwoSum: exact rounding error of s1 + s2
    return s, e1 + e2 + err


def split12(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x = hi + lo with hi holding the top 12 significand bits (bit mask, so no FMA can blur it)."""
    hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-4096), F32)  # 0xFFFFF000
    return hi, x - hi


def two_prod(a: jax.Array, b: jax.Array, rnd=rounded) -> tuple[jax.Array, jax.Array]:
    """p + e = a * b exactly (Dekker, with mask splitting: no FMA needed).

    ``rnd`` forces a product's rounding (``rounded``; inside a Pallas kernel, its own barrier)."""
    p = rnd(a * b)
    ah, al = split12(a)
    bh, bl = split12(b)
    e = ((rnd(ah * bh) - p) + rnd(ah * bl) + rnd(al * bh)) + rnd(al * bl)
    return p, e


def div(a, b, rnd=rounded) -> jax.Array:
    """a / b correctly rounded (to within rare midpoint cases) on every backend.

    XLA's GPU division is not IEEE (about a quarter of quotients are off by an ulp);
    one correction step with the exact residual a - q*b fixes the quotient. Where the step
    itself is NaN (b infinite or 0, q infinite: 0·inf in the residual) q is IEEE's answer:
    1 / (1 + e^x) is 0, not NaN, for a gate past -88.7 in the SwiGLU."""
    a = jnp.asarray(a, F32)
    b = jnp.asarray(b, F32)
    q = a / b
    p, e = two_prod(q, b, rnd)
    r = (a - p) - e
    c = q + r / b
    return jnp.where(jnp.isnan(c), q, c)


def sqrt(v: jax.Array, rnd=rounded) -> jax.Array:
    """sqrt(v) correctly rounded (XLA's GPU sqrt is approximate); v >= 0."""
    s = jnp.sqrt(v)
    p, e = two_prod(s, s, rnd)
    r = (v - p) - e
    return jnp.where(s > 0, s + r / (2.0 * s), s)


def asum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Σ over ``axis``, accurate to ~1e-14 relative before the final f32 rounding.

    Double-float accumulation with error-free TwoSum in a variadic reduce: the
    result is (almost always) the correctly rounded sum whatever order XLA picks,
    so a row's value does not depend on the program's batch shape. Every float
    reduction that feeds the model's discrete steps (int8, FP8, FP4, f16 and top-k
    roundings, which amplify 1-ulp differences) goes through here; that is what
    makes prefill, chunked prefill, decode and the N=2 verifier agree bit for bit.
    """
    x = x.astype(F32)
    return dd_total(x, jnp.zeros_like(x), axis)


def with_terms(y: jax.Array, terms) -> jax.Array:
    """Σ_k terms + y (terms [T, k, d]: the routed experts' outputs beside the shared expert's y):
    the FFN's output, one ``asum`` over the k then one f32 add; y where terms is None. The XLA path
    of ``hc.hc_post_carry``'s terms, which the post-mix kernel sums itself."""
    return y if terms is None else asum(terms, 1) + y


def dd_sum(s: jax.Array, e: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Double-float sum of (s, e) pairs over ``axis`` in one variadic reduce: the (s, e) pair.
    ``asum``'s reduction; kernels call it too (one Triton reduction, ``pallas_kernels.common``)."""
    return lax.reduce((s, e), (F32(0), F32(0)), dd_add, (axis % s.ndim,))


def dd_total(s: jax.Array, e: jax.Array, axis: int = -1) -> jax.Array:
    """``dd_sum`` rounded once to f32."""
    s, e = dd_sum(s, e, axis)
    return s + e


def take(x: jax.Array, axis: int, i: int) -> jax.Array:
    """x[..., i, ...] along ``axis`` (a kernel passes its own: Triton cannot slice values)."""
    return lax.index_in_dim(x, i, axis, keepdims=False)


def chain_sum(x: jax.Array, axis: int = -1, take=take) -> jax.Array:
    """``asum`` over a short axis (a few elements) as an unrolled TwoSum chain of elementwise ops.

    Same value as ``asum`` (the correctly rounded sum, almost always) without a reduction, for
    kernels that cannot reduce or slice a register tile (they pass their own ``take``)."""
    x = x.astype(F32)
    axis = axis % x.ndim
    acc = (take(x, axis, 0), jnp.zeros_like(take(x, axis, 0)))
    for i in range(1, x.shape[axis]):
        xi = take(x, axis, i)
        acc = dd_add(acc, (xi, jnp.zeros_like(xi)))
    return acc[0] + acc[1]


def adot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] · w [O, K] -> [..., O] with ``asum`` over K (each product rounded once)."""
    return asum(rounded(x[..., None, :].astype(F32) * w.astype(F32)), axis=-1)


def sum_squares(x: jax.Array) -> jax.Array:
    """Σ x² over the last axis as ds4 does it in double: x² is split into three exactly
    representable f32 products, then summed with ``asum``."""
    hi, lo = split12(x.astype(F32))
    return asum(jnp.concatenate([hi * hi, 2.0 * hi * lo, lo * lo], axis=-1))


def rms_scale(x: jax.Array, eps: float) -> jax.Array:
    """1 / sqrt(mean(x²) + eps) over the last axis, keepdims, as ds4: IEEE sqrt, true division.

    The barrier stops XLA from rewriting 1/sqrt into its approximate rsqrt, whose last
    bit depends on how the loop was vectorised (so on the batch shape).
    """
    ms = sum_squares(x) / F32(x.shape[-1])  # a power of two: exact
    return div(1.0, sqrt(ms + F32(eps)))[..., None]


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    y = x * rms_scale(x, eps)
    return y if weight is None else y * weight.astype(F32)


# ---- elementwise -----------------------------------------------------------------
# exp and log are built from +, *, rounding and exponent bits. XLA's own exp/log
# lower to different code in vectorised and scalar loops, so their last bit
# depended on the batch shape (1 ulp in exp(sink - m) was enough to flip later
# FP8/int8 roundings). These are within ~1 ulp of the correctly rounded values.
_LN2_HI = np.float32(0.693145751953125)  # 12 significant bits: n * _LN2_HI is exact
_LN2_LO = np.float32(1.4286068203094172e-06)
_EXP_POLY = [np.float32(1.0 / math.factorial(k)) for k in range(8, -1, -1)]


_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


def exp(x: jax.Array, rnd=rounded) -> jax.Array:
    """e^x for float32 x (0 below -87.3, where ds4's expf is subnormal or 0).

    ``rnd`` forces a product's rounding (``rounded``; inside a Pallas kernel, its own barrier)."""
    x = x.astype(F32)
    xc = jnp.clip(x, -87.0, 88.5)
    # round-half-even to an integer by adding and removing 1.5·2^23 (|t| < 2^22): what
    # jnp.round gives, written with + and - because Triton cannot lower jnp.round; ``rnd``
    # rounds the product first (no FMA) and keeps the sum a rounded f32 value.
    n = rnd(rnd(xc * F32(1.4426950408889634)) + _ROUND_MAGIC) - _ROUND_MAGIC
    r = (xc - n * _LN2_HI) - rnd(n * _LN2_LO)  # |r| <= ln2/2
    p = jnp.full_like(r, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:  # Horner, Taylor to degree 8
        p = rnd(p * r) + c
    scale = lax.bitcast_convert_type(((n.astype(jnp.int32) + 127) << 23), F32)  # 2^n
    y = p * scale
    return jnp.where(x < -87.3, F32(0.0), jnp.where(x > 88.7, F32(np.inf), y))


def log(v: jax.Array) -> jax.Array:
    """Natural log of positive float32 v."""
    m, e = jnp.frexp(v.astype(F32))  # v = m 2^e, m in [0.5, 1)
    small = m < F32(0.70710678)
    m = jnp.where(small, m * 2.0, m)
    e = jnp.where(small, e - 1, e).astype(F32)
    s = div(m - 1.0, m + 1.0)  # |s| <= 0.1716
    s2 = s * s
    q = F32(1.0 / 13)
    for k in (11, 9, 7, 5, 3, 1):
        q = rounded(q * s2) + F32(1.0 / k)
    return e * _LN2_HI + (rounded(e * _LN2_LO) + rounded(2.0 * s * q))


def sigmoid(x, rnd=rounded):
    return div(1.0, 1.0 + exp(-x, rnd), rnd)


def silu(x, rnd=rounded):
    return x * sigmoid(x, rnd)


def swiglu(g, u, clamp: float, rnd=rounded):
    """The FFN's SwiGLU as ds4 computes it: the gate clamped above only, the up on both sides.
    ``rnd``: inside a Pallas kernel, its own rounding barrier (``pallas_kernels.quantize``)."""
    return silu(jnp.minimum(g, clamp), rnd) * jnp.clip(u, -clamp, clamp)


def softplus(x):
    """ds4's stable softplus: x above 20, exp(x) below -20, log1p(exp(x)) between."""
    u = exp(jnp.clip(x, -20.0, 20.0))
    v = 1.0 + u
    mid = jnp.where(v == 1.0, u, log(v) * div(u, jnp.where(v == 1.0, 1.0, v - 1.0)))  # log1p(u), Goldberg
    return jnp.where(x > 20.0, x, jnp.where(x < -20.0, exp(x), mid))


# ---- activation quantization (ds4's CPU path) -------------------------------------
def _round_even(v: jax.Array, rnd, in_kernel: bool) -> jax.Array:
    """v rounded half to even to an integer (|v| < 2^22). jnp.round on the XLA path; in a
    kernel, adding and removing 1.5·2^23 with forced roundings (Triton cannot lower jnp.round):
    the same integers (as in ``exp``)."""
    if not in_kernel:
        return jnp.round(v)
    return rnd(rnd(v) + _ROUND_MAGIC) - _ROUND_MAGIC


def quantize_q8_0(x: jax.Array, rnd=rounded, in_kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-32 int8 blocks: d = amax/127 (kept f32), q = clamp(rne(x * (1/d))); d = 0 gives q = 0.

    Returns (q int8 [..., n], d float32 [..., n/32]). ``rnd``/``in_kernel``: inside a Pallas
    kernel (the Q8_0 kernel quantizes its activations with this function), its own rounding
    barrier, and the round written in ops Triton can lower.
    """
    n = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], n // 32, 32)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    d = divide_by(amax, 127.0, rnd)
    inv = jnp.where(d > 0, div(1.0, jnp.where(d > 0, d, F32(1.0)), rnd), F32(0.0))
    q = jnp.clip(_round_even(xb * inv[..., None], rnd, in_kernel), -128, 127)
    return q.astype(jnp.int8).reshape(x.shape), d


def quantize_q8_k(x: jax.Array, rnd=rounded, in_kernel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-256 Q8_K blocks: m = the element of largest |x| (first on ties), iscale = -127/m,
    q = clamp(rne(iscale*x), -128, 127), d = 1/iscale. All-zero block gives d = 0, q = 0.

    Returns (q int8 [..., n], d float32 [..., n/256]). (bsums are recomputed where needed.)
    ``rnd``/``in_kernel``: inside a Pallas kernel (the expert kernel quantizes its activations
    with this function), its own rounding barrier, and m picked by a masked sum (Triton has
    no gather; one nonzero term, so exact).
    """
    n = x.shape[-1]
    xb = x.reshape(*x.shape[:-1], n // 256, 256)
    idx = jnp.argmax(jnp.abs(xb), axis=-1)  # first maximum on ties
    if in_kernel:
        at = lax.broadcasted_iota(jnp.int32, xb.shape, xb.ndim - 1) == idx[..., None].astype(jnp.int32)
        m = jnp.sum(jnp.where(at, xb, F32(0.0)), axis=-1)
    else:
        m = jnp.take_along_axis(xb, idx[..., None], axis=-1)[..., 0]
    nz = m != 0
    iscale = jnp.where(nz, div(-127.0, jnp.where(nz, m, F32(1.0)), rnd), F32(0.0))
    q = jnp.clip(_round_even(iscale[..., None] * xb, rnd, in_kernel), -128, 127)
    d = jnp.where(nz, div(1.0, jnp.where(nz, iscale, F32(1.0)), rnd), F32(0.0))
    return q.astype(jnp.int8).reshape(x.shape), d


# ---- model-intrinsic QAT simulations (MODEL.md §3.7) ------------------------------
def _ceil_log2(r: jax.Array) -> jax.Array:
    """ceil(log2(r)) for r > 0, exactly (from the float's exponent and mantissa)."""
    m, e = jnp.frexp(r)  # r = m * 2^e, m in [0.5, 1)
    return jnp.where(m == 0.5, e - 1, e)  # exact powers of two keep their exponent


def fp8_e4m3_round_trip(x: jax.Array, block: int, rnd=None) -> jax.Array:
    """FP8-E4M3FN simulation per ``block`` values: power-of-two scale from amax/448. ``rnd``: inside
    a kernel, its barrier (the exponent-bit forms of frexp, ldexp and round; the same bits)."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), F32(1e-4))
    if rnd is not None:
        e = ceil_log2_bits(divide_by(amax, 448.0, rnd))
        v = round_to_grid_bits(jnp.clip(xb * pow2(-e), -448.0, 448.0), 3, -6, rnd)
        return (v * pow2(e)).reshape(x.shape)
    e = _ceil_log2(divide_by(amax, 448.0))
    v = jnp.clip(jnp.ldexp(xb, -e), -448.0, 448.0)
    v = round_to_grid(v, 3, -6)  # E4M3FN: 3 mantissa bits, normals from 2^-6, nearest even
    return jnp.ldexp(v, e).reshape(x.shape)


def fp8_e4m3_head(x: jax.Array, n: int, block: int) -> jax.Array:
    """x [..., d] with its first n values through ``fp8_e4m3_round_trip`` (the KV rows' non-rotary
    dims), the rest as they are. A concatenation: written back into x (2,208.7 µs of kernels a
    step at 8 layers) or selected over the whole row (2,182.7) was not faster (2,181.4; H200,
    session 26)."""
    return jnp.concatenate([fp8_e4m3_round_trip(x[..., :n], block), x[..., n:]], axis=-1)


def _select_const(table: np.ndarray, k: jax.Array) -> jax.Array:
    """table[k] for a small constant table, by a chain of selects (a kernel cannot gather from it)."""
    out = jnp.full(k.shape, F32(table[0]))
    for j in range(1, len(table)):
        out = jnp.where(k == j, F32(table[j]), out)
    return out


_FP4_LEVELS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def fp4_e2m1_round_trip(x: jax.Array, block: int, rnd=None) -> jax.Array:
    """FP4-E2M1 simulation per ``block`` values (ties to the even level index). ``rnd``: inside a
    kernel, its barrier (exponent-bit forms of frexp and ldexp, the level picked by selects; the
    same bits)."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), F32(7.052966104933725e-38))
    lv = _FP4_LEVELS
    mids = (lv[:-1] + lv[1:]) / 2
    if rnd is not None:  # Triton: no frexp, ldexp, gathers from constants or sign
        e = ceil_log2_bits(divide_by(amax, 6.0, rnd))
        v = jnp.clip(xb * pow2(-e), -6.0, 6.0)
        a = jnp.abs(v)
        i = sum((a > F32(m)).astype(jnp.int32) for m in mids)
        tie = (i < 7) & (a == _select_const(mids, jnp.minimum(i, 6)))
        i = jnp.where(tie & (i % 2 == 1), i + 1, i)
        sign = jnp.where(v > 0, F32(1.0), jnp.where(v < 0, F32(-1.0), v))  # jnp.sign: ±0 stays ±0
        return (_select_const(lv, i) * sign * pow2(e)).reshape(x.shape)
    e = _ceil_log2(divide_by(amax, 6.0))
    v = jnp.clip(jnp.ldexp(xb, -e), -6.0, 6.0)
    a = jnp.abs(v)
    lv, mids = jnp.asarray(lv), jnp.asarray(mids)
    i = jnp.sum(a[..., None] > mids, axis=-1)  # level below a, or the one above a midpoint
    # a exactly on the midpoint between levels i and i+1: ties go to the even index
    # (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
    tie = (i < 7) & (a == mids[jnp.minimum(i, 6)])
    i = jnp.where(tie & (i % 2 == 1), i + 1, i)
    r = lv[i] * jnp.sign(v)
    return jnp.ldexp(r, e).reshape(x.shape)


def hadamard(x: jax.Array) -> jax.Array:
    """Walsh–Hadamard transform (Sylvester order) of the last axis, times 1/sqrt(n)."""
    n = x.shape[-1]
    h = x
    stride = 1
    while stride < n:  # butterflies (a, b) -> (a + b, a - b) with stride 1, 2, 4, ...
        h = h.reshape(*x.shape[:-1], n // (2 * stride), 2, stride)
        a, b = h[..., 0, :], h[..., 1, :]
        h = jnp.stack([a + b, a - b], axis=-2)
        stride *= 2
    return h.reshape(x.shape) * F32(1.0 / np.sqrt(n))
