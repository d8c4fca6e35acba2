"""Float-weight matmuls (``numerics.adot``: the compressors' kv and gate, the indexer's q_b and
projection, all F16 in ds4's files) for N ≤ 4 activation rows, several matrices of one K a launch.

Programs (row tile, K split). A token's chain is a [rows, BK] tile of double-float lanes: each
step adds the rounded products w·x of the next BK columns (``two_sum_add``, the product's rounding
forced by ``opaque`` as ``numerics.rounded`` forces it); at the end a double-float reduction over
the lanes (``numerics.dd_sum``) and, with no K split, one rounding; with splits, ``finish`` adds
the split pairs in order after the launch. Every sum is a double-float sum rounded once, as
``numerics.asum``: the XLA path's bits wherever those sums round correctly (the premise of every
double-float kernel here). Each token has its own chain, so a row's bits do not depend on N; BK and
the split follow the shape alone.

Why: XLA runs these as one ``adot`` fusion per matrix pair at 41-53 % of the copy bandwidth (H200,
session 26-27 by-source tables: 340.8 µs for the compressors' kv and gate, 182.0 µs for the
indexer's q_b, a 43-layer step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import adot, dd_sum
from pallas_kernels.common import F32, by_row_tile, finished, is_pow2, kernel_zero, matrix_columns, opaque, two_sum_add

__all__ = ["FloatConfig", "choose_config", "matmul", "reference", "supported"]

MAX_TOKENS = 4
N_SM = 132  # H100/H200 SMs: the split rule's target of two programs an SM


@dataclasses.dataclass(frozen=True)
class FloatConfig:
    """rows a program, columns a step (BK: the lanes, which decide the sums' order), K splits
    (decide the order too), warps. BK and splits follow the launch's shape only (``choose_config``)."""

    block_rows: int = 8
    block_k: int = 128
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def reference(x, w):
    """x [N, K] · w [O, K] → [N, O]: ``numerics.adot`` (each product rounded, ``asum`` over K)."""
    return adot(x, w)


def supported(outs: tuple, k: int) -> bool:
    """Matrices of ``outs`` rows and one K: K a multiple of 64 (the narrowest step) and every
    matrix's rows a multiple of 2."""
    return k % 64 == 0 and all(o % 2 == 0 for o in outs)


def choose_config(outs: tuple, k: int, rows: int | None = None, block_k: int | None = None) -> FloatConfig:
    """BK the widest power of two ≤ ``block_k`` dividing K; the rows per program a power of two ≤
    ``rows`` dividing every matrix's rows; K splits doubled while the grid has fewer than two
    programs an SM (the split depends on the total shape, never on N). By default 16 rows, BK 256
    and 8 warps for K ≥ 4096, else 8 rows, BK 128 and 4 warps. H200, session 28, N=1, the launches
    alone, µs: the compressors' kv+gate (ratio 4) 8.81 at 16/256/8 against 12.36 at 8/128/4 and XLA's
    9.78; the input's five matrices of a ratio-4 layer 13.23 against 22.28 and XLA's 18.63; the
    indexer's q_b (K = 1024) 8.04 at 8/128/4 against 9.52 at 16/256/8 and XLA's 9.71."""
    wide = k >= 4096
    rows = rows or (16 if wide else 8)
    block_k = block_k or (256 if wide else 128)
    bk = block_k
    while k % bk:
        bk //= 2
    r = rows
    while any(o % r for o in outs):
        r //= 2
    tiles, splits = sum(outs) // r, 1
    while tiles * splits < 2 * N_SM and (k // bk) % (2 * splits) == 0:
        splits *= 2
    return FloatConfig(block_rows=r, block_k=bk, k_splits=splits, num_warps=8 if wide else 4)


def _kernel(z_ref, x_ref, *refs, cfg: FloatConfig, steps: int, n: int, np_: int, tiles: tuple):
    n_out = 1 if cfg.k_splits == 1 else 2
    mats, out_refs = refs[: len(tiles)], refs[len(tiles) :]
    BO, BK = cfg.block_rows, cfg.block_k
    i, j = pl.program_id(0), pl.program_id(1)
    zero = z_ref[0]

    def run(m, tile):
        w_ref = mats[m]
        rows = pl.ds(tile * BO, BO)

        def body(step, carry):
            w = w_ref[rows, pl.ds(step * BK, BK)].astype(F32)  # [BO, BK]
            out = []
            for t, (s, e) in enumerate(carry):
                x = x_ref[t, pl.ds(step * BK, BK)]  # [BK]
                out.append(two_sum_add(s, e, opaque(w * x[None, :], zero)))
            return tuple(out)

        zeros = jnp.zeros((BO, BK), F32)
        chains = jax.lax.fori_loop(j * steps, (j + 1) * steps, body, ((zeros, zeros),) * n)
        sums = [dd_sum(s, e, -1) for s, e in chains]  # [BO] pairs, one reduction a token
        t_of = jax.lax.broadcasted_iota(jnp.int32, (np_, 1), 0)
        # [np_, BO] (rows past n stay zero: their outputs are dropped)
        return tuple(sum(jnp.where(t_of == t, p[h][None, :], 0.0) for t, p in enumerate(sums)) for h in (0, 1))

    s, e = by_row_tile(run, tiles, i)
    if n_out == 1:
        out_refs[0][...] = s + e
    else:
        out_refs[0][...] = s
        out_refs[1][...] = e


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def matmul(x, ws, cfg: FloatConfig | None = None, interpret: bool = False):
    """x [N, K] f32 (N ≤ 4) against a float weight [O, K] or a tuple of them (one K): [N, O] or the
    tuple of [N, O_m], one launch."""
    many = isinstance(ws, (tuple, list))
    ws = tuple(ws) if many else (ws,)
    n, k = x.shape
    outs = tuple(w.shape[0] for w in ws)
    cfg = cfg or choose_config(outs, k)
    BO, BK, S = cfg.block_rows, cfg.block_k, cfg.k_splits
    if (
        n > MAX_TOKENS
        or any(w.ndim != 2 or w.shape[1] != k for w in ws)
        or any(o % BO for o in outs)
        or k % (BK * S)
        or not (is_pow2(BO) and is_pow2(BK))
    ):
        raise ValueError(f"float matmul kernel: unsupported N={n}, weights {outs}x{k}, {cfg}")
    np_ = 1 << (n - 1).bit_length()  # the output tile's token rows: a power of two
    out = sum(outs)
    n_out = 1 if S == 1 else 2
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    x = jnp.pad(x.astype(F32), ((0, np_ - n), (0, 0)))  # a block of power-of-two rows (N = 3 only)
    res = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, steps=k // BK // S, n=n, np_=np_, tiles=tuple(o // BO for o in outs)),
        grid=(out // BO, S),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), whole(x), *map(whole, ws)],
        out_specs=[pl.BlockSpec((None, np_, BO), lambda i, j: (j, 0, i))] * n_out,
        out_shape=[jax.ShapeDtypeStruct((S, np_, out), F32)] * n_out,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="float_dense",
    )(kernel_zero(x, interpret), x, *ws)
    y = finished(res)[:n]
    return tuple(y[:, start : start + o] for start, o in matrix_columns(outs)) if many else y
