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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import NO_SCORE, dd_add, dd_sum, div, exp
from pallas_kernels.common import F32, is_pow2, kernel_zero, opaque

__all__ = ["pool", "supported"]

COLS = 32  # columns a program (H200, session 25, ratio 4: 1.55 µs against 1.72 at 64 and 2.10 at 128)
COLS_LONG = 16  # ... for windows of LONG rows and more (ratio 128: 3.21 µs against 4.97 at 32)
LONG = 32
WARPS = 4


def cols_for(ratio: int, hd: int) -> int:
    return min(hd, COLS_LONG if ratio >= LONG else COLS)


def supported(ratio: int, coff: int, hd: int) -> bool:
    """Triton tiles: the window length and the column block powers of two."""
    return coff in (1, 2) and is_pow2(ratio) and is_pow2(hd) and hd % cols_for(ratio, hd) == 0


def _kernel(z_ref, *refs, two: bool):
    rnd = functools.partial(opaque, zero=z_ref[0])
    if two:
        pk_ref, ps_ref, ck_ref, cs_ref, o_ref = refs
        tiles = ((pk_ref[...], ps_ref[...]), (ck_ref[...], cs_ref[...]))  # previous, current window
    else:
        ck_ref, cs_ref, o_ref = refs
        tiles = ((ck_ref[...], cs_ref[...]),)
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
    o_ref[...] = jnp.where(m <= NO_SCORE, 0.0, pooled)[None, :]


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
