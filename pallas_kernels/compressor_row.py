"""A compressor's new rows, from the pooled windows to the f16 cache, as one launch that skips the
windows still incomplete.

After the pooling (``compressor_pool``) XLA runs a row's RMS norm, its tail RoPE, the round trip (the
attention's FP8 head, or the indexer's Hadamard and FP4), the f16 rounding and the write into the
cache as ~5 kernels a compressor, on every decode token, although a ratio-4 window completes on
every 4th token and a ratio-128 one on every 128th (session 26's 43-layer table: ~190 µs a step for
the 41 attention compressors). A row of an incomplete window sits past ``n // ratio``, invisible
until the window's last token rewrites it, so here a program (one a window slot) returns at once
unless its window is complete, and writes its row into the cache (aliased: the other rows stay) only
then. The arithmetic is the model's own functions on register tiles (``numerics``: the norm's sums,
the RoPE's rounded products, ``fp8_e4m3_round_trip`` / ``fp4_e2m1_round_trip`` and ``round_to_grid``
in their exponent-bit forms, the Hadamard kernel's stages), so a written row has the XLA path's bits;
the rows it skips keep what the cache held.

Both kinds are in ``auto`` (``dispatch.COMPRESSOR_ROW_IN_AUTO``, ``INDEXER_ROW_IN_AUTO``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import f16_round_bits, fp4_e2m1_round_trip, fp8_e4m3_round_trip
from pallas_kernels import hadamard
from pallas_kernels.common import F32, is_pow2, kernel_zero, opaque
from pallas_kernels.norms import rms_scale, rotate_tail

__all__ = ["rows_into_cache", "supported"]

WARPS = 4


def supported(hd: int, n_pairs: int, trip: tuple) -> bool:
    """Triton tiles: the row and its FP8/FP4 blocks powers of two. ``trip``: ("fp8", n_nope, block)
    for an attention compressor, ("fp4", block) for the indexer's (its Hadamard in registers)."""
    block = trip[-1]
    if not (is_pow2(hd) and is_pow2(block) and 0 < 2 * n_pairs < hd):
        return False
    if trip[0] == "fp8":
        return trip[1] % block == 0
    return trip[0] == "fp4" and hd % block == 0 and hadamard.supported(hd)


def _kernel(z_ref, meta_ref, rows_ref, w_ref, cos_ref, sin_ref, _cache_ref, o_ref, *, eps, ratio, n_pairs, trip):
    zero = z_ref[0]
    rnd = functools.partial(opaque, zero=zero)
    s = pl.program_id(0)

    @pl.when(s < meta_ref[1])  # this slot's window is complete (or every slot: ``every``)
    def _():
        x = rows_ref[...]  # [1, hd]
        hd = x.shape[-1]
        y = (x * rms_scale(x, eps, zero)) * w_ref[...][None, :]  # numerics.rms_norm's order
        # The tail RoPE at the window's start position, its cos/sin gathered from the flat tables
        lane = lax.broadcasted_iota(jnp.int32, (1, hd // 2), 1)
        at = (meta_ref[2] + ratio * s) * n_pairs + jnp.maximum(lane - (hd // 2 - n_pairs), 0)
        y = rotate_tail(y, cos_ref[at], sin_ref[at], n_pairs, rnd)
        if trip[0] == "fp8":  # FP8 round trip of the non-rotary dims, by blocks (numerics.fp8_e4m3_head)
            f = fp8_e4m3_round_trip(y, trip[2], rnd)
            y = jnp.where(lax.broadcasted_iota(jnp.int32, (1, hd), 1) < trip[1], f, y)
        else:  # the indexer's: Hadamard, then FP4 round trip of the whole row
            y = fp4_e2m1_round_trip(hadamard.transform(y), trip[1], rnd)
        row = f16_round_bits(y, rnd)
        o_ref[pl.ds(pl.multiple_of((meta_ref[0] + s) * hd, hd), hd)] = row.reshape(hd)


@functools.partial(jax.jit, static_argnames=("n_tok", "ratio", "eps", "trip", "interpret", "every"))
def rows_into_cache(
    rows,
    w,
    cos_tab,
    sin_tab,
    cache,
    pos0,
    n_tok: int,
    ratio: int,
    eps: float,
    trip: tuple,
    interpret=False,
    every=False,
):
    """The cache [cap, hd] f16 with the rows of the chunk's complete windows written: rows [S, hd] the
    pooled slots (slot s starts at position pos0 − pos0 mod ratio + s·ratio, its cache row
    pos0 // ratio + s), w [hd] the norm's weight, cos_tab / sin_tab [ctx, n_pairs] the compressed
    layers' RoPE tables, ``trip`` as in ``supported``; ``n_tok`` the chunk's tokens (padding
    included: a row a padding token completes is invisible too). Rows of incomplete windows are
    not written; with ``every`` (a prefill chunk) they are, as the XLA path writes them (its
    ``dynamic_update_slice``: the S rows from pos0 // ratio, that start clamped to the cache), so
    the cache is the XLA path's in every row."""
    S, hd = rows.shape
    n_pairs = cos_tab.shape[-1]
    rem = pos0 % ratio
    first, done = pos0 // ratio, (rem + n_tok) // ratio
    if every:
        first, done = jnp.minimum(first, cache.shape[0] - S), S
    meta = jnp.stack([first, done, pos0 - rem]).astype(jnp.int32)
    flat = cache.reshape(-1)
    whole = lambda a: pl.BlockSpec(a.shape, lambda s: (0,) * a.ndim)
    args = [kernel_zero(rows, interpret), meta, rows.astype(F32), w.astype(F32)]
    args += [cos_tab.reshape(-1).astype(F32), sin_tab.reshape(-1).astype(F32), flat]
    kernel = functools.partial(_kernel, eps=eps, ratio=ratio, n_pairs=n_pairs, trip=trip)
    out = pl.pallas_call(
        kernel,
        grid=(S,),
        in_specs=[whole(args[0]), whole(meta), pl.BlockSpec((1, hd), lambda s: (s, 0)), *map(whole, args[3:])],
        out_specs=whole(flat),
        out_shape=jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
        interpret=interpret,
        name="compressor_row",
    )(*args)
    return out.reshape(cache.shape)
