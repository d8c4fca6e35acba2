"""Fused RMS norms for the attention input side (decode and the verifier).

* ``rms_norm_quant``: RMS norms with the int8 quantization of their outputs that the Q8_0 and
  expert kernels read, in one launch: the layer's input norms, and the Q_A and KV_A low-rank
  outputs of a token normalised (with their own weights) together; with ``kv_row`` the KV_A rows
  come out as the raw window stores them (tail RoPE, FP8 head, f16), and with ``ring`` (decode)
  the launch writes the token's row straight into its slot of the raw window, in place.
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
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import dd_total, div, f16_round_bits, fp8_e4m3_round_trip, rms_norm, split12, sqrt
from ds4jax.model.rope import apply_rope_tail
from pallas_kernels.common import F32, SplitSums, finished, is_pow2, kernel_zero, opaque, pick, two_sum_add, value_of
from pallas_kernels.quantize import KINDS


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


def rms_scale(x, eps, zero):
    """1/sqrt(mean(x²) + eps) per row of x [R, n] (keepdims)."""
    z = jnp.zeros_like(x)
    return scale_from_squares(*add_squares(z, z, x), x.shape[-1], eps, zero)[:, None]


# ---- norms with their activations' quantization ---------------------------------------------
# Programs a token: each sums its whole rows' squares, then writes 1/CHUNKS of them. H200, session
# 23: a launch at N=1 attn_norm 3.20 µs (8 warps) against XLA's norm then the quantize launch 5.48,
# the Q_A/KV_A pair 2.96 against 6.16, ffn_norm with both kinds 4.09 against 6.94; 1 program a token
# 4.87 / 3.33 / 7.31, 2 warps 5.54 / 3.57 / 6.34. 8 full-size layers, GPU time a step: 2,327.4 µs
# and 560 kernels (4 chunks, 4 warps) against 2,375.6 and 616 without it; 8 chunks 2,320.5, 2 2,327.9.
CHUNKS = 4
WARPS = 8  # 4: attn_norm 4.00 µs at N=1, 4.32 at N=2 (8: 3.20, 3.26); the others within 0.1 µs


def rms_norm_quant_reference(parts, eps: float):
    """parts ((x [T, n], w [n], kinds), ...) → per part (rms_norm(x, w), {kind: (q, d)}): the
    normalised rows and their int8 quantization for each of ``kinds`` ("q8_0", "q8_k")."""
    out = []
    for x, w, kinds in parts:
        y = rms_norm(value_of(x), w, eps)
        out.append((y, {k: KINDS[k][0](y) for k in kinds}))
    return tuple(out)


def _kv_row(y, cos_ref, sin_ref, n: int, kv, rnd):
    """This program's slice y [1, c] of a KV row as the raw window stores it: the tail RoPE (cos/sin
    gathered from the flat [T·n_pairs] tables), the FP8 round trip of the first n_nope dims, f16
    (``attention.kv_row_values``' functions on the tile)."""
    n_nope, block, n_pairs = kv
    j = pl.program_id(1)
    y = rotate_tail_slice(y, cos_ref, sin_ref, pl.program_id(0), j, n, n_pairs, rnd)
    col = j * y.shape[-1] + lax.broadcasted_iota(jnp.int32, (1, y.shape[-1]), 1)
    y = jnp.where(col < n_nope, fp8_e4m3_round_trip(y, block, rnd), y)
    return f16_round_bits(y, rnd)


def _norm_quant_kernel(z_ref, *refs, eps, kinds, kv, width, ring, forms):
    zero = z_ref[0]
    rnd = functools.partial(opaque, zero=zero)
    counts = [3 if f == 0 else 2 * f + 1 for f in forms]  # a part's refs: (row, slice) blocks, weight
    n_in = sum(counts) + (2 if kv else 0) + (2 if ring else 0)
    ins, extra, outs = refs[: sum(counts)], refs[sum(counts) : n_in], iter(refs[n_in:])
    at = 0
    for i, part in enumerate(kinds):
        f, mine = forms[i], ins[at : at + counts[i]]
        at += counts[i]
        if f == 0:
            row, x = mine[0][...].astype(F32), mine[1][...].astype(F32)
        else:  # a matmul's split partials (``SplitSums``), added here as ``finish`` adds them
            row, x = finished(mine[:f]), finished(mine[f : 2 * f])
        w_ref = mine[-1]
        scale = rms_scale(row, eps, zero)  # [1, 1]: the whole row's
        y = (x * scale) * w_ref[...].astype(F32)[None, :]  # this program's slice
        if kv and i == len(kinds) - 1:  # the KV row (no quantization of it: part == ())
            kv16 = _kv_row(y, *extra[:2], width, kv, rnd)
            if not ring:
                next(outs)[...] = kv16
                continue
            # Decode: this program's slice of the row into the token's slot of the flat ring [W·n]
            # (aliased: the other rows stay as they are; no program writes another's columns).
            c = kv16.shape[-1]
            dst = pl.multiple_of(extra[3][0] * width + pl.program_id(1) * c, c)
            next(outs)[pl.ds(dst, c)] = kv16.reshape(c)
            continue
        next(outs)[...] = y
        for k in part:  # blocks never straddle a slice (quant_supported)
            q, d = KINDS[k][0](y, rnd, in_kernel=True)
            next(outs)[...] = q
            next(outs)[...] = d


def quant_supported(parts, chunks: int, kv=None, ring=None) -> bool:
    """Every part's rows split into ``chunks`` power-of-two slices of whole quantization blocks;
    with ``kv`` (n_nope, block, n_pairs) the last part unquantized and its slices of whole FP8 blocks;
    with ``ring`` (the raw window [W, n], slot) one token and a power-of-two ring of n-wide rows."""
    for x, _, kinds in parts:
        n = x.shape[-1]
        if x.ndim != 2 or not is_pow2(n) or n % chunks or any((n // chunks) % KINDS[k][1] for k in kinds):
            return False
        if isinstance(x, SplitSums) and (x.start % n or not is_pow2(x.arrays[0].shape[0])):
            return False  # its blocks: whole rows of the part's width, power-of-two splits
    if kv is not None:
        n_nope, block, n_pairs = kv
        x, _, kinds = parts[-1]
        n = x.shape[-1]
        c = n // chunks
        if kinds or not is_pow2(block) or c % block or n_nope % block or not 0 < 2 * n_pairs <= n - n_nope:
            return False
    if ring is not None:
        raw = ring[0]
        if kv is None or parts[-1][0].shape[0] != 1 or raw.ndim != 2 or raw.shape[1] != parts[-1][0].shape[1]:
            return False
        if raw.dtype != jnp.float16 or not is_pow2(raw.size):
            return False
    return is_pow2(chunks) and len({x.shape[0] for x, _, _ in parts}) == 1


@functools.partial(jax.jit, static_argnames=("eps", "kinds", "chunks", "warps", "interpret", "kv"))
def _norm_quant(z, xs, ws, eps, kinds, chunks, warps, interpret, kv=None, tables=(), ring=()):
    T = xs[0].shape[0]
    in_specs, args, out_specs, out_shape = [pl.BlockSpec((1,), lambda t, c: (0,))], [z], [], []
    forms = tuple(len(x.arrays) if isinstance(x, SplitSums) else 0 for x in xs)
    for i, (x, w, part) in enumerate(zip(xs, ws, kinds)):
        n = x.shape[1]
        c = n // chunks
        if forms[i]:  # the partials' blocks [S, 1, n] and [S, 1, c] at the part's columns
            S, b = x.arrays[0].shape[0], x.start // n
            in_specs += [pl.BlockSpec((S, 1, n), lambda t, j, b=b: (0, t, b))] * forms[i]
            in_specs += [pl.BlockSpec((S, 1, c), lambda t, j, b=b * chunks: (0, t, b + j))] * forms[i]
            args += [*x.arrays, *x.arrays]
        else:
            in_specs += [
                pl.BlockSpec((1, n), lambda t, j: (t, 0)),  # the whole row, for its squares
                pl.BlockSpec((1, c), lambda t, j: (t, j)),
            ]
            args += [x, x]
        in_specs.append(pl.BlockSpec((c,), lambda t, j: (j,)))
        args.append(w)
        row16 = kv is not None and i == len(xs) - 1  # the KV row, as the raw window stores it
        if row16 and ring:  # ... written into its slot of the flat ring
            out_specs.append(pl.BlockSpec((ring[0].size,), lambda t, j: (0,)))
            out_shape.append(jax.ShapeDtypeStruct((ring[0].size,), jnp.float16))
        else:
            out_specs.append(pl.BlockSpec((1, c), lambda t, j: (t, j)))
            out_shape.append(jax.ShapeDtypeStruct((T, n), jnp.float16 if row16 else F32))
        for k in part:
            b = KINDS[k][1]
            out_specs += [pl.BlockSpec((1, c), lambda t, j: (t, j)), pl.BlockSpec((1, c // b), lambda t, j: (t, j))]
            out_shape += [jax.ShapeDtypeStruct((T, n), jnp.int8), jax.ShapeDtypeStruct((T, n // b), F32)]
    for tab in tables:  # the KV row's RoPE cos/sin [T, n_pairs], flat: gathered per pair
        flat = tab.reshape(-1).astype(F32)
        in_specs.append(pl.BlockSpec(flat.shape, lambda t, j: (0,)))
        args.append(flat)
    aliases = {}
    if ring:  # the raw window, flat, aliased to the KV part's output (the last: it has no quantization)
        raw, slot = ring
        aliases = {len(args): len(out_shape) - 1}
        in_specs += [pl.BlockSpec((raw.size,), lambda t, j: (0,)), pl.BlockSpec((1,), lambda t, j: (0,))]
        args += [raw.reshape(-1), jnp.reshape(slot, (1,)).astype(jnp.int32)]
    return pl.pallas_call(
        functools.partial(
            _norm_quant_kernel, eps=eps, kinds=kinds, kv=kv, width=xs[-1].shape[-1], ring=bool(ring), forms=forms
        ),
        grid=(T, chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_quant",
    )(*args)


def rms_norm_quant(
    parts, eps: float, chunks: int = CHUNKS, warps: int = WARPS, interpret: bool = False, kv_row=None, ring=None
):
    """``rms_norm_quant_reference`` in one launch: programs (token, slice) normalise every part's
    slice and quantize it, so XLA's norm fusions and the quantize launch become one launch, and
    the pair Q_A/KV_A reads each input once. The same bits: the model's functions on tiles.
    ``kv_row`` (cos, sin [T, n_pairs], n_nope, block): the last part's output is its row as the raw
    window stores it (tail RoPE, FP8 head, f16), not the normed f32 row; with ``ring`` (raw [W, n]
    f16, slot) as well, one token's: the raw window with that row in row ``slot``, written in place
    (the window is aliased; donate it to keep the write in place)."""
    xs = tuple(x for x, _, _ in parts)
    ws = tuple(w for _, w, _ in parts)
    kinds = tuple(tuple(k) for _, _, k in parts)
    kv, tables = None, ()
    if kv_row is not None:
        cos, sin, n_nope, block = kv_row
        kv, tables = (n_nope, block, cos.shape[-1]), (cos, sin)
    z = kernel_zero(ws[0], interpret)
    flat = list(_norm_quant(z, xs, ws, eps, kinds, chunks, warps, interpret, kv, tables, ring or ()))
    if ring is not None:
        flat[-1] = flat[-1].reshape(ring[0].shape)
    flat = iter(flat)
    return tuple((next(flat), {k: (next(flat), next(flat)) for k in part}) for part in kinds)


# ---- head norm + tail RoPE ---------------------------------------------------------------------
def head_norm_rope_reference(q, cos, sin, eps: float):
    """q [T, H, hd]; cos/sin [T, n_rot/2]."""
    return apply_rope_tail(rms_norm(q, None, eps), cos[:, None, :], sin[:, None, :])


def rotate_tail(y, c, s, n_pairs: int, rnd):
    """``rope.apply_rope_tail`` on register tiles: y [R, hd], c/s [R or 1, hd/2] each pair's angle
    (the pairs before the last n_pairs keep their values, whatever c/s hold there); ``rnd``: the
    kernel's rounding barrier."""
    R, hd = y.shape
    y3 = y.reshape(R, hd // 2, 2)
    y0, y1 = pick(y3, 2, 0), pick(y3, 2, 1)  # [R, hd/2] pair members
    r0 = rnd(y0 * c) - rnd(y1 * s)
    r1 = rnd(y0 * s) + rnd(y1 * c)
    tail = lax.broadcasted_iota(jnp.int32, (1, hd // 2), 1) >= hd // 2 - n_pairs
    r0, r1 = jnp.where(tail, r0, y0), jnp.where(tail, r1, y1)
    which = lax.broadcasted_iota(jnp.int32, (R, hd // 2, 2), 2)
    return jnp.where(which == 0, r0[:, :, None], r1[:, :, None]).reshape(R, hd)


def rotate_tail_slice(y, cos_ref, sin_ref, token, chunk, width: int, n_pairs: int, rnd, inverse: bool = False):
    """``rope.apply_rope_tail`` (``inverse``: its inverse) on y [R, c], the columns [chunk·c,
    (chunk + 1)·c) of rows of ``width``: each row's last n_pairs pairs rotated by its token's angles,
    gathered from the flat [T·n_pairs] cos/sin tables (``token``: an index, or [R, 1] of them); the
    other pairs keep their values."""
    c = y.shape[-1]
    pair = chunk * (c // 2) + lax.broadcasted_iota(jnp.int32, (1, c // 2), 1)  # the row's pair index
    at = token * n_pairs + jnp.clip(pair - (width // 2 - n_pairs), 0, n_pairs - 1)
    s = sin_ref[at]
    rot = rotate_tail(y, cos_ref[at], -s if inverse else s, c // 2, rnd)  # every pair; the head's are dropped
    col = chunk * c + lax.broadcasted_iota(jnp.int32, (1, c), 1)
    return jnp.where(col >= width - 2 * n_pairs, rot, y)


def _head_kernel(z_ref, q_ref, c_ref, s_ref, o_ref, *, eps, n_pairs):
    zero = z_ref[0]
    x = q_ref[...].astype(F32)  # [HB, hd]
    y = x * rms_scale(x, eps, zero)  # the normalised values, as stored by the sequential path
    # c/s [1, hd/2]: cos and sin for the tail pairs, 1 and 0 elsewhere (unused there)
    rnd = functools.partial(opaque, zero=zero)
    o_ref[...] = rotate_tail(y, c_ref[...][None, :], s_ref[...][None, :], n_pairs, rnd)


# Heads a program of ``head_norm_rope`` where dispatch takes it (read at trace time: ab variants).
# H200, session 29 (call G), 8 full-size layers, one process: 1 / 2 / 4 heads a program 1,975.0 /
# 1,983.4 / 1,993.9 µs of kernels a step against XLA's 1,999.5 (at 16: +47.6 µs, session 27).
HEADS_A_PROGRAM = 1


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
