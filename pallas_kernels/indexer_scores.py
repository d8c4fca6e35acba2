"""The indexer's scores of decode and the verifier (``ds4jax.model.indexer.select_rows``: per head
the ReLU of q·k over the head dim, then the heads' weighted sum) in one launch and an elementwise
epilogue, instead of XLA's reductions (11.5 µs a ratio-4 layer for the dots alone at N=1, H200,
session 24's profile: 64 heads × 1,041 rows × 128).

Programs (token, head block, key block): for ``HEADS`` heads and ``KEYS`` rows of the f16 table,
each dot is the double-float sum of the rounded products over the head dim (the loop walks it in
``D_CHUNK`` columns), rounded once and ReLU'd; then the rounded products with the heads' weights,
summed over the block's heads as a double-float pair, written unrounded. Splitting the heads gives
the launch 8× the programs (one program walking all 64 heads would leave most SMs idle at N=1).
XLA's epilogue (``common.finish``) adds the head blocks' pairs in order and rounds once, where it
fuses with the visibility mask. Every sum is a double-float sum rounded once, as ``numerics.asum``,
so the bits are the XLA path's wherever those sums round correctly (the premise of every
double-float kernel here).

H200, session 24, 8 full-size layers in one process: 2,225.9 against 2,250.6 µs of kernels a step
(−8.2 µs a layer with the indexer), the same number of kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import dd_sum
from pallas_kernels.common import F32, finish, is_pow2, kernel_zero, opaque, two_sum_add

__all__ = ["scores", "supported"]

HEADS = 8  # heads a program (all of them where a model has fewer)
KEYS = 16  # table rows a program
D_CHUNK = 32  # head-dim columns a step
WARPS = 4
# Skip the blocks past each token's visible rows (``n_visible``); False sums every block. What it
# saves grows with the context allocated (the table's rows), not the one filled: timed with the
# attention's skip (``attention.SKIP_UNSEEN``, session 47).
SKIP_UNSEEN = True
I32 = jnp.int32


def supported(q: jax.Array, table: jax.Array) -> bool:
    """q [T, H, hd] with H and hd powers of two, hd a multiple of D_CHUNK, table [R, hd]."""
    if q.ndim != 3 or table.ndim != 2:
        return False
    _, H, hd = q.shape
    return table.shape[1] == hd and is_pow2(H) and is_pow2(hd) and hd % D_CHUNK == 0


def _kernel(z_ref, nv_ref, q_ref, w_ref, k_ref, s_ref, e_ref, *, n_rows, hb, hd, dc):
    blk = pl.program_id(2)
    # Rows from the token's visible count on are masked by the caller: a block of them is written
    # as zeros without its dots (a long context's cache rows not yet written).
    live = blk * KEYS < nv_ref[pl.program_id(0)]

    @pl.when(live)
    def _():
        _block(z_ref, q_ref, w_ref, k_ref, s_ref, e_ref, blk, n_rows=n_rows, hb=hb, hd=hd, dc=dc)

    @pl.when(jnp.logical_not(live))
    def _():
        s_ref[0, 0, :] = jnp.zeros((KEYS,), F32)
        e_ref[0, 0, :] = jnp.zeros((KEYS,), F32)


def _block(z_ref, q_ref, w_ref, k_ref, s_ref, e_ref, blk, *, n_rows, hb, hd, dc):
    rnd = functools.partial(opaque, zero=z_ref[0])
    rows = jnp.clip(blk * KEYS + lax.broadcasted_iota(I32, (KEYS,), 0), 0, n_rows - 1)  # padded keys: a real row
    base = rows[None, :, None] * hd + lax.broadcasted_iota(I32, (1, 1, dc), 2)
    z = jnp.zeros((hb, KEYS, dc), F32)

    def step(c, acc):
        c0 = pl.multiple_of(c * dc, dc)
        qc, kc = q_ref[0, :, :, pl.ds(c0, dc)], k_ref[base + c0]  # [hb, 1, D], [1, KEYS, D]
        return two_sum_add(*acc, rnd(qc * kc.astype(F32)))  # products rounded first (no FMA)

    s, e = dd_sum(*lax.fori_loop(0, hd // dc, step, (z, z)))  # [hb, KEYS]
    dots = jnp.maximum(s + e, 0.0)
    weighted = rnd(w_ref[0, :, :] * dots)  # [hb, 1] × [hb, KEYS]
    ws, we = dd_sum(weighted, jnp.zeros_like(weighted), axis=0)  # [KEYS]: the block's heads
    s_ref[0, 0, :] = ws
    e_ref[0, 0, :] = we


@functools.partial(jax.jit, static_argnames=("interpret", "warps", "dc"))
def scores(q, weights, table, n_visible=None, interpret: bool = False, warps: int = WARPS, dc: int = D_CHUNK):
    """q [T, H, hd] f32, weights [T, H] f32, table [R, hd] (f16) → scores [T, R] f32: Σ_h
    weights[t, h]·max(Σ_d q[t, h, d]·table[r, d], 0) with the products rounded and each sum a
    double-float sum rounded once, as ``select_rows``. With ``n_visible`` [T] the rows from a
    token's count on are the caller's to mask: only the blocks that start before it are summed (the
    others hold zeros). ``warps``, ``dc`` only time."""
    T, H, hd = q.shape
    every = n_visible is None or not SKIP_UNSEEN
    nv = jnp.full((T,), table.shape[0], I32) if every else n_visible.astype(I32)
    R, hb = table.shape[0], min(HEADS, H)
    n_blocks = -(-R // KEYS)
    part = jax.ShapeDtypeStruct((H // hb, T, n_blocks * KEYS), F32)
    part_spec = pl.BlockSpec((1, 1, KEYS), lambda t, h, b: (h, t, b))
    s, e = pl.pallas_call(
        functools.partial(_kernel, n_rows=R, hb=hb, hd=hd, dc=dc),
        grid=(T, H // hb, n_blocks),
        in_specs=[
            pl.BlockSpec((1,), lambda *_: (0,)),
            pl.BlockSpec((T,), lambda *_: (0,)),
            pl.BlockSpec((1, hb, 1, hd), lambda t, h, b: (t, h, 0, 0)),  # q in the products' layout
            pl.BlockSpec((1, hb, 1), lambda t, h, b: (t, h, 0)),
            pl.BlockSpec((R * hd,), lambda *_: (0,)),  # flat: rows are gathered by offset
        ],
        out_specs=[part_spec, part_spec],
        out_shape=[part, part],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2),
        interpret=interpret,
        name="indexer_scores",
    )(kernel_zero(q, interpret), nv, q.astype(F32).reshape(T, H, 1, hd), weights.astype(F32)[..., None], table.reshape(-1))
    return finish(s, e)[:, :R]
