"""The decode step's attention sums (``ds4jax.model.attention.sink_attention`` at N = 1..4) in
one launch a key set plus one for the softmax and mix, instead of XLA's fusions.

1. ``attn_scores``, programs (token, head block, key block): each (head, key) score is the
   double-float sum over the head dim of the rounded products q·k, times the scale, masked to -inf
   where the key is not visible.
2. ``attn_mix``, programs (token, head block, head-dim block): the running max of the scores with
   the sink, then per key chunk e = exp(s - m) into the denominator's sum and into each key set's
   mix, both double-float sums per lane; each set's mix is rounded on its own and the sets are
   added in order, then scaled by the reciprocal of the denominator, as the reference does.

Every sum is a double-float sum rounded once, as ``numerics.asum`` (one Triton reduction across
lanes, ``common.dd_sum``), so the bits are the XLA path's wherever those sums round correctly.
Keys come as [R, hd] (shared by the tokens: the raw window, the ratio-128 rows) or [T, R, hd]
(the indexer's rows, gathered per token); R is padded to the key block with invisible rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import dd_sum, div, exp
from pallas_kernels.common import F32, kernel_zero, opaque, two_sum_add

__all__ = ["sink_attention", "supported"]

HEADS = 8  # heads a program
KEYS = 16  # keys a step (the key block of the scores launch)
D_CHUNK = 64  # head-dim columns a step of the scores' loop, and a mix program's columns
WARPS = 8  # 2 x HEADS x KEYS x D_CHUNK live sums: 64 registers a thread at 8 warps (255 at 4, offline)


def supported(q: jax.Array, parts) -> bool:
    """q [T, H, hd] with H a multiple of HEADS and hd of D_CHUNK (powers of two); one or two key sets."""
    if q.ndim != 3 or not 1 <= len(parts) <= 2:
        return False
    T, H, hd = q.shape
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0
    keys_ok = all(k.shape[-1] == hd and k.ndim in (2, 3) and v.shape == (T, k.shape[-2]) for k, v in parts)
    return keys_ok and pow2(H) and pow2(hd) and H % HEADS == 0 and hd % D_CHUNK == 0


def _scores_kernel(z_ref, q_ref, k_ref, v_ref, o_ref, *, scale, per_token):
    rnd = functools.partial(opaque, zero=z_ref[0])
    hd = q_ref.shape[-1]
    z = jnp.zeros((HEADS, KEYS, D_CHUNK), F32)

    def step(c, acc):
        c0 = pl.multiple_of(c * D_CHUNK, D_CHUNK)
        qc = q_ref[0, :, pl.ds(c0, D_CHUNK)]  # [HEADS, D]
        kc = (k_ref[0, :, pl.ds(c0, D_CHUNK)] if per_token else k_ref[:, pl.ds(c0, D_CHUNK)]).astype(F32)
        return two_sum_add(*acc, rnd(qc[:, None, :] * kc[None, :, :]))  # products rounded first (no FMA)

    s, e = dd_sum(*lax.fori_loop(0, hd // D_CHUNK, step, (z, z)))  # [HEADS, KEYS]
    visible = v_ref[0, :] != 0  # [KEYS]
    o_ref[0] = jnp.where(visible[None, :], rnd((s + e) * scale), -jnp.inf)


def _mix_kernel(z_ref, sink_ref, *refs, n_parts, per_token):
    rnd = functools.partial(opaque, zero=z_ref[0])
    s_refs, k_refs, o_ref = refs[:n_parts], refs[n_parts : 2 * n_parts], refs[-1]
    sink = sink_ref[...]  # [HEADS]
    chunks = [s_ref.shape[-1] // KEYS for s_ref in s_refs]
    scores = lambda p, r: s_refs[p][0, :, pl.ds(pl.multiple_of(r * KEYS, KEYS), KEYS)]  # [HEADS, KEYS]

    m = sink
    for p in range(n_parts):  # the max over every key and the sink (exact in any order)
        m = lax.fori_loop(0, chunks[p], lambda r, m, p=p: jnp.maximum(m, jnp.max(scores(p, r), axis=1)), m)
    zd = jnp.zeros((HEADS, KEYS), F32)
    zm = jnp.zeros((HEADS, KEYS, o_ref.shape[-1]), F32)
    den = (zd, zd)
    o = None
    for p in range(n_parts):

        def step(r, carry, p=p):
            den, mix = carry
            e = exp(scores(p, r) - m[:, None], rnd)  # [HEADS, KEYS]; 0 where masked
            r0 = pl.multiple_of(r * KEYS, KEYS)
            k = (k_refs[p][0, pl.ds(r0, KEYS), :] if per_token[p] else k_refs[p][pl.ds(r0, KEYS), :]).astype(F32)
            return two_sum_add(*den, e), two_sum_add(*mix, rnd(e[:, :, None] * k[None, :, :]))

        den, mix = lax.fori_loop(0, chunks[p], step, (den, (zm, zm)))
        s, e = dd_sum(*mix, axis=1)  # [HEADS, D]: this key set's mix, rounded once
        o = s + e if o is None else o + (s + e)
    s, e = dd_sum(*den)
    total = exp(sink - m, rnd) + (s + e)
    o_ref[0] = o * div(jnp.ones_like(total), total, rnd)[:, None]


def _pad_keys(k, v, multiple):
    R = k.shape[-2]
    Rp = -(-R // multiple) * multiple
    if Rp == R:
        return k, v.astype(jnp.int32)
    pad_k = [(0, 0)] * (k.ndim - 2) + [(0, Rp - R), (0, 0)]
    return jnp.pad(k, pad_k), jnp.pad(v.astype(jnp.int32), ((0, 0), (0, Rp - R)))


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def sink_attention(q, parts, sink, scale: float, interpret: bool = False):
    """q [T, H, hd] f32; ``parts``: ((keys [R, hd] or [T, R, hd], visible [T, R]), ...); sink [H];
    ``scale`` a static f32 → [T, H, hd], as ``ds4jax.model.attention.sink_attention`` (K = V)."""
    T, H, hd = q.shape
    zero = kernel_zero(q, interpret)
    one = pl.BlockSpec((1,), lambda *_: (0,))
    params = plgpu.CompilerParams(num_warps=WARPS, num_stages=2)
    q = q.astype(F32)
    scores, keys = [], []
    for k, v in parts:
        k, v = _pad_keys(k, v, KEYS)
        per_token = k.ndim == 3
        Rp = k.shape[-2]
        k_spec = (
            pl.BlockSpec((1, KEYS, hd), lambda t, h, r: (t, r, 0))
            if per_token
            else pl.BlockSpec((KEYS, hd), lambda t, h, r: (r, 0))
        )
        s = pl.pallas_call(
            functools.partial(
                _scores_kernel, scale=float(np.float32(scale)), per_token=per_token
            ),  # a literal: exact in f32
            grid=(T, H // HEADS, Rp // KEYS),
            in_specs=[
                one,
                pl.BlockSpec((1, HEADS, hd), lambda t, h, r: (t, h, 0)),
                k_spec,
                pl.BlockSpec((1, KEYS), lambda t, h, r: (t, r)),
            ],
            out_specs=pl.BlockSpec((1, HEADS, KEYS), lambda t, h, r: (t, h, r)),
            out_shape=jax.ShapeDtypeStruct((T, H, Rp), F32),
            compiler_params=params,
            interpret=interpret,
            name="attn_scores",
        )(zero, q, k, v)
        scores.append(s)
        keys.append(k)
    per_token = tuple(k.ndim == 3 for k in keys)
    s_specs = [pl.BlockSpec((1, HEADS, s.shape[-1]), lambda t, h, c: (t, h, 0)) for s in scores]
    k_specs = [
        pl.BlockSpec((1, k.shape[1], D_CHUNK), lambda t, h, c: (t, 0, c))
        if k.ndim == 3
        else pl.BlockSpec((k.shape[0], D_CHUNK), lambda t, h, c: (0, c))
        for k in keys
    ]
    return pl.pallas_call(
        functools.partial(_mix_kernel, n_parts=len(parts), per_token=per_token),
        grid=(T, H // HEADS, hd // D_CHUNK),
        in_specs=[one, pl.BlockSpec((HEADS,), lambda t, h, c: (h,)), *s_specs, *k_specs],
        out_specs=pl.BlockSpec((1, HEADS, D_CHUNK), lambda t, h, c: (t, h, c)),
        out_shape=jax.ShapeDtypeStruct((T, H, hd), F32),
        compiler_params=params,
        interpret=interpret,
        name="attn_mix",
    )(zero, sink.astype(F32), *scores, *keys)
