"""A compressor's window pooling (``ds4jax.model.compressor._pool``) as one launch.

Per window slot and column: the max of the window's scores, ``e = exp(score - max)``, then
``Σ rounded(e·kv) / Σ e`` with both sums double-float sums rounded once (``numerics.asum``) and
the quotient correctly rounded (``numerics.div``); a window with no real score pools to 0. XLA
runs that as ~4 fusions a compressor (the overlapping windows' concatenation, the max and exp,
two sums): 30 fusions and ~69 µs of an 8-layer full-size step (H200, session 24's profile).

Programs (slot, column block). The ratio-4 layers' overlapping windows (``coff == 2``) read the
previous window through the first ``hd`` columns and the current one through the last ``hd``: two
tiles of the same buffers, at row blocks ``s`` and ``s + 1`` (the buffer leads with one window of
history), so nothing is concatenated. A program holds ratio × COLS elements of each operand:
``COLS_LONG`` columns for the long windows (ratio 128) keep that at 2,048.

H200, session 25 (``speed-bench/kernels.py --only compressor_pool``, N=1): 1.55 µs a launch against
XLA's 4.26 for the ratio-4 attention compressor, 1.58 against 4.06 for the indexer's, 3.21 against
8.34 at ratio 128; exact at every shape. 8 full-size layers, one process: −26.7 µs of kernels a step.

At decode (``pool_ring``) the window comes straight from the frontier ring (``state.py``) and the
token's row, which the launch also writes into its ring slot: the window buffer (an XLA select a
compressor) and XLA's write of the row go away (session 27: −111.7 µs and −109 kernels a 43-layer
step against XLA's decode on the same ring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import NEG_INF, NO_SCORE, dd_add, dd_sum, div, exp
from pallas_kernels.common import F32, is_pow2, kernel_zero, opaque

__all__ = ["pool", "pool_ring", "supported"]

COLS = 32  # columns a program (H200, session 25, ratio 4: 1.55 µs against 1.72 at 64 and 2.10 at 128)
COLS_LONG = 16  # ... for windows of LONG rows and more (ratio 128: 3.21 µs against 4.97 at 32)
LONG = 32
WARPS = 4


def cols_for(ratio: int, hd: int) -> int:
    return min(hd, COLS_LONG if ratio >= LONG else COLS)


def supported(ratio: int, coff: int, hd: int) -> bool:
    """Triton tiles: the window length and the column block powers of two."""
    return coff in (1, 2) and is_pow2(ratio) and is_pow2(hd) and hd % cols_for(ratio, hd) == 0


def _pooled(tiles, rnd):
    """The pooled [1, cols] from the window's (kv, score) tiles [rows, cols], previous window first."""
    m = tiles[0][1].max(axis=0)
    for _, sc in tiles[1:]:
        m = jnp.maximum(m, sc.max(axis=0))
    num = den = None
    for kv, sc in tiles:  # the previous window's rows first: the reference's concatenation order
        e = exp(sc - m[None, :], rnd)
        n_part = dd_sum(rnd(e * kv), jnp.zeros_like(e), axis=0)
        d_part = dd_sum(e, jnp.zeros_like(e), axis=0)
        num = n_part if num is None else dd_add(num, n_part)
        den = d_part if den is None else dd_add(den, d_part)
    pooled = div(num[0] + num[1], den[0] + den[1], rnd)
    return jnp.where(m <= NO_SCORE, 0.0, pooled)[None, :]


def _kernel(z_ref, *refs, two: bool):
    rnd = functools.partial(opaque, zero=z_ref[0])
    if two:
        pk_ref, ps_ref, ck_ref, cs_ref, o_ref = refs
        tiles = ((pk_ref[...], ps_ref[...]), (ck_ref[...], cs_ref[...]))  # previous, current window
    else:
        ck_ref, cs_ref, o_ref = refs
        tiles = ((ck_ref[...], cs_ref[...]),)
    o_ref[...] = _pooled(tiles, rnd)


@functools.partial(jax.jit, static_argnames=("ratio", "coff", "hd", "n_slots", "interpret", "cols", "warps"))
def pool(
    buf_kv,
    buf_sc,
    ratio: int,
    coff: int,
    hd: int,
    n_slots: int,
    interpret: bool = False,
    cols: int | None = None,
    warps: int = WARPS,
):
    """``compressor._pool``'s [n_slots, hd] from the window-aligned buffers [L, coff·hd] f32 (L =
    (coff − 1 + n_slots)·ratio), bit for bit. ``cols`` and ``warps`` change only the launch."""
    cols = cols or cols_for(ratio, hd)
    # The current window: row block s (s + 1 behind the history window when coff = 2), and there
    # the second half of the columns; the previous window: row block s, the first half.
    tile = pl.BlockSpec((ratio, cols), lambda s, c: (s + coff - 1, c + (coff - 1) * (hd // cols)))
    specs = [tile, tile]
    args = [buf_kv, buf_sc]
    if coff == 2:
        prev = pl.BlockSpec((ratio, cols), lambda s, c: (s, c))
        specs = [prev, prev, *specs]
        args = [buf_kv, buf_sc, *args]
    return pl.pallas_call(
        functools.partial(_kernel, two=coff == 2),
        grid=(n_slots, hd // cols),
        in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), *specs],
        out_specs=pl.BlockSpec((1, cols), lambda s, c: (s, c)),
        out_shape=jax.ShapeDtypeStruct((n_slots, hd), F32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="compressor_pool",
    )(kernel_zero(buf_kv, interpret), *args)


# ---- decode: the frontier ring read in place, the token's row written into it -------------------
def _ring_kernel(z_ref, meta_ref, kv_ref, sc_ref, nkv_ref, nsc_ref, o_ref, okv_ref, osc_ref, *, ratio, coff, hd, cols):
    rnd = functools.partial(opaque, zero=z_ref[0])
    c = pl.program_id(0)
    C = coff * hd  # a ring row (flat refs: the rows' starts are dynamic)
    prev0, cur0, rem = meta_ref[0], meta_ref[1], meta_ref[2]
    j = lax.broadcasted_iota(jnp.int32, (ratio, 1), 0)
    col = c * cols + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
    ccol = col + (coff - 1) * hd  # the current window's columns
    at = (cur0 + j) * C + ccol
    # The window as the reference's buffer holds it: the ring's rows before the token, the token's row,
    # then (0, -1e30) where the ring holds rows of an older window.
    kv = jnp.where(j == rem, nkv_ref[ccol], jnp.where(j < rem, kv_ref[at], 0.0))
    sc = jnp.where(j == rem, nsc_ref[ccol], jnp.where(j < rem, sc_ref[at], NEG_INF))
    tiles = [(kv, sc)]
    if coff == 2:
        atp = (prev0 + j) * C + col
        tiles = [(kv_ref[atp], sc_ref[atp]), (kv, sc)]
    o_ref[...] = _pooled(tiles, rnd)
    # The token's row into its slot, this program's columns of it (no program reads another's columns;
    # the ring's old values at the slot were read above and replaced).
    for off in (0, hd) if coff == 2 else (0,):
        src = pl.ds(pl.multiple_of(off + c * cols, cols), cols)
        dst = pl.ds(pl.multiple_of((cur0 + rem) * C + off + c * cols, cols), cols)
        okv_ref[dst] = nkv_ref[src]
        osc_ref[dst] = nsc_ref[src]


@functools.partial(jax.jit, static_argnames=("ratio", "coff", "hd", "interpret", "cols", "warps"))
def pool_ring(
    ring_kv,
    ring_sc,
    kv,
    sc,
    pos0,
    ratio: int,
    coff: int,
    hd: int,
    interpret: bool = False,
    cols: int | None = None,
    warps: int = WARPS,
):
    """Decode's pooling straight from the frontier ring (``state.py``) [coff·ratio, coff·hd] f32 and
    the token's (kv, score) row [1, coff·hd] at position ``pos0``: (the pooled [1, hd], (ring_kv',
    ring_sc')) with the row in its slot, written in place (the rings are aliased). The bits of
    ``compressor._pool`` over the window buffer that ``frontier_view`` and the row make."""
    cols = cols or cols_for(ratio, hd)
    R, C = coff * ratio, coff * hd
    w = pos0 // ratio
    cur = (w % 2) * ratio if coff == 2 else jnp.int32(0)
    meta = jnp.stack([((w + 1) % 2) * ratio, cur, pos0 % ratio]).astype(jnp.int32)
    flat = [a.reshape(-1).astype(F32) for a in (ring_kv, ring_sc, kv, sc)]
    whole = lambda a: pl.BlockSpec(a.shape, lambda c: (0,) * a.ndim)
    args = [kernel_zero(ring_kv, interpret), meta, *flat]
    pooled, okv, osc = pl.pallas_call(
        functools.partial(_ring_kernel, ratio=ratio, coff=coff, hd=hd, cols=cols),
        grid=(hd // cols,),
        in_specs=[whole(a) for a in args],
        out_specs=[pl.BlockSpec((1, cols), lambda c: (0, c)), whole(flat[0]), whole(flat[1])],
        out_shape=[
            jax.ShapeDtypeStruct((1, hd), F32),
            jax.ShapeDtypeStruct((R * C,), F32),
            jax.ShapeDtypeStruct((R * C,), F32),
        ],
        input_output_aliases={2: 1, 3: 2},
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="compressor_pool_ring",
    )(*args)
    return pooled, (okv.reshape(R, C), osc.reshape(R, C))
