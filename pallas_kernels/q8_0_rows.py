"""Q8_0 matmul for a prefill chunk's rows on the tensor cores.

Why: at a prefill chunk's 64 rows the dense projections took the reference's exact integer einsum
(``q8_0.reference``), which XLA runs as reductions, not as dots. On an H200 this kernel takes
2.0-5.4x less time at every Q8_0 shape of the model, and the prefill of 8 full-size layers runs 26 %
faster with the same bits (speed-bench/KERNELS.md "Session 38"). The share-weight kernel (``q8_0``)
serves 1..4 rows.

Numerics, the reference's: per 32-wide block one int8 ``dot`` of the program's rows with its weight
rows ([BT, 32] x [32, BO], int32 accumulation: exact), the product with the block scales rounded as
the reference rounds it (d·dx first, then isum·scale, through ``opaque`` so no FMA swallows it), and a
TwoSum chain over the program's blocks in order; K splits' (s, e) partials are added in order by
``finish``. The reference's ``numerics.asum`` rounds a double-float sum once, so this order gives its
bits (as the decode launches' chains do), whatever the split.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import F32, finish, kernel_zero, opaque, pow2_at_least, two_sum_add

I32 = jnp.int32
QK = 32  # Q8_0 block


@dataclasses.dataclass(frozen=True)
class RowsConfig:
    """Launch shape: token rows and weight rows a program, K splits (their partials added in order
    after the launch), warps, pipelining stages. Only time: any split gives the reference's bits."""

    block_t: int = 64
    block_rows: int = 64
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def supported(out: int, k: int, groups: int = 1) -> bool:
    """Whole Q8_0 blocks, and each group's rows a multiple of 16 (a dot's smallest side)."""
    return k % QK == 0 and out % groups == 0 and (out // groups) % 16 == 0


def choose_config(n: int, out: int, k: int, groups: int = 1, n_sm: int = 132) -> RowsConfig:
    """64 weight rows a program where a group's rows allow (fewer otherwise), the chunk's rows in one
    tile up to 64; then the K split doubles until the programs fill the SMs twice."""
    r = out // groups
    rows = 64
    while r % rows:
        rows //= 2
    bt = min(64, pow2_at_least(n, 16))
    programs = -(-n // bt) * (out // rows)
    nb, splits = k // QK, 1
    while programs * splits < 2 * n_sm and nb % (2 * splits) == 0 and nb // (2 * splits) >= 8:
        splits *= 2
    return RowsConfig(block_t=bt, block_rows=rows, k_splits=splits)


def _kernel(z_ref, x_ref, dx_ref, qs_ref, d_ref, s_ref, e_ref, *, cfg: RowsConfig, r: int, k: int):
    it, io, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    BT, BO = cfg.block_t, cfg.block_rows
    nb = k // QK
    steps = nb // cfg.k_splits
    zero = z_ref[0]
    toks, rows = pl.ds(it * BT, BT), pl.ds(io * BO, BO)
    g = (io * BO) // r  # the rows' group: its slice of x

    def body(b, carry):
        s, e = carry
        xb = x_ref[toks, pl.ds(g * k + b * QK, QK)]  # [BT, 32] int8
        wb = qs_ref[rows, pl.ds(b * QK, QK)]  # [BO, 32] int8
        isum = lax.dot_general(xb, wb, (((1,), (1,)), ((), ())), preferred_element_type=I32)  # [BT, BO], exact
        d = d_ref[rows, pl.ds(b, 1)].astype(F32)  # [BO, 1]
        dx = dx_ref[toks, pl.ds(g * nb + b, 1)]  # [BT, 1]
        scale = d.reshape(1, BO) * dx  # the reference's d · dx, then isum · scale
        return two_sum_add(s, e, opaque(isum.astype(F32) * scale, zero))

    zeros = jnp.zeros((BT, BO), F32)
    s, e = lax.fori_loop(j * steps, (j + 1) * steps, body, (zeros, zeros))
    s_ref[...] = s
    e_ref[...] = e


@functools.partial(jax.jit, static_argnames=("groups", "cfg", "interpret"))
def matmul(xq, dx, qs, d, groups: int = 1, cfg: RowsConfig | None = None, interpret: bool = False):
    """y [n, out] = x · Wᵀ for Q8_0 weights: xq [n, G·K] int8, dx [n, G·K/32] f32, qs [G·r, K] int8,
    d [G·r, K/32] f16 (group g's rows read x's g-th K columns, as ``q8_0.reference``)."""
    n = xq.shape[0]
    out, k = qs.shape
    if not supported(out, k, groups) or xq.shape[1] != groups * k:
        raise ValueError(f"q8_0_rows: unsupported {out}x{k} weight in {groups} groups for x {xq.shape}")
    cfg = cfg or choose_config(n, out, k, groups)
    BT, BO, S = cfg.block_t, cfg.block_rows, cfg.k_splits
    r = out // groups
    if r % BO or (k // QK) % S:
        raise ValueError(f"q8_0_rows: {cfg} does not tile {out}x{k} in {groups} groups")
    n_pad = -(-n // BT) * BT  # padded rows: zero activations and scales, dropped after
    if n_pad != n:
        xq = jnp.pad(xq, ((0, n_pad - n), (0, 0)))
        dx = jnp.pad(dx, ((0, n_pad - n), (0, 0)))
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, o, j: (0,) * a.ndim)
    args = [kernel_zero(dx, interpret), xq, dx, qs, d]
    part = pl.BlockSpec((None, BT, BO), lambda i, o, j: (j, i, o))
    s, e = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, r=r, k=k),
        grid=(n_pad // BT, out // BO, S),
        in_specs=[whole(a) for a in args],
        out_specs=[part, part],
        out_shape=[jax.ShapeDtypeStruct((S, n_pad, out), F32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="q8_0_rows",
    )(*args)
    return finish(s, e)[:n]
