"""Q8_0 share-weight matmul on Mosaic GPU (``plgpu``): the Triton kernel's counterpart, for the
Triton-vs-Mosaic comparison the issue asks for (speed-bench/kernels.py ``--only q8_0_mosaic``).

Same numerics as ``q8_0.reference``: y[t, o] = Σ_b rnd(isum[t,o,b] · rnd(d[o,b] · dx[t,b])) with
exact int32 block dots, summed in double-float (TwoSum) and rounded once.

Hopper's wgmma takes M = 64 rows, so the weights are the left operand and the tokens (padded to
8, the smallest N) the right one; one m64n8k32 instruction is exactly one Q8_0 block's dot for
64 rows and 8 tokens, so no block-diagonal activations are needed. Each pipeline step brings U
blocks of BO rows into shared memory by TMA (``plgpu.emit_pipeline``, ``stages`` in flight),
issues U wgmmas into U accumulators, waits once, and scales and TwoSum-adds the U products in
block order into one (s, e) chain per output: the order is fixed by the weight's shape, and the
tokens are independent columns, so a token's result does not depend on N.

The operands are repacked once (what ``quant/planes.py`` would do at load time): the weight as
[nb, out, 32] (block-major, so a block is a [rows, 32] tile), the block scales as [nb, out].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import F32, opaque, two_sum_add

I32 = jnp.int32
QK = 32
NT = 8  # tokens per wgmma (its smallest N); N ≤ 4 are padded
MAX_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_rows: int = 64  # wgmma M: 64 per instruction
    blocks_per_step: int = 16  # U blocks (U wgmmas, U accumulators) per pipeline step
    stages: int = 3  # pipeline steps in flight


def repack(qs, d):
    """Load-time planes for this kernel: qs [out, K] → [nb, out, 32]; d [out, nb] → [nb, out]."""
    out, k = qs.shape[-2:]
    lead = qs.shape[:-2]
    qb = jnp.moveaxis(qs.reshape(*lead, out, k // QK, QK), -2, -3)
    return qb, jnp.swapaxes(d, -1, -2)


def supported(out: int, k: int, groups: int = 1, cfg: MosaicConfig = MosaicConfig()) -> bool:
    r, nb = out // groups, k // QK
    return k % QK == 0 and out % groups == 0 and r % cfg.block_rows == 0 and nb % cfg.blocks_per_step == 0


def _tiles(interpret: bool, swizzle: int = 32, elem_bytes: int = 1):
    # 32-byte rows (one block) → 32-byte swizzle; the interpreter takes untransformed refs.
    if interpret:
        return ()
    return (plgpu.TilingTransform((8, swizzle // elem_bytes)), plgpu.SwizzleTransform(swizzle))


def _kernel(
    w_gmem,
    x_gmem,
    d_gmem,
    dx_gmem,
    small_gmem,
    o_gmem,
    o_smem,
    small_smem,
    bar,
    *,
    cfg,
    steps,
    tiles_per_group,
    interpret,
):
    U, BO = cfg.blocks_per_step, cfg.block_rows
    i = lax.axis_index("rows")
    plgpu.copy_gmem_to_smem(small_gmem, small_smem, bar)
    plgpu.barrier_wait(bar)
    zero = small_smem[0][None, :]  # [1, 8] int32 zeros the compiler cannot see (no FMA contraction)
    mat = small_smem[1, 0]  # which matrix of the stack (the bench rotates copies through one call)
    g = i // tiles_per_group

    def step(_, w_s, x_s, d_s, dx_s, carry):
        def issue(*accs):
            for u in range(U):
                plgpu.wgmma(accs[u], w_s.at[u], x_s.at[u].T)  # [BO, 32] · [32, 8]: block u's dots
            return [acc[...] for acc in accs]  # the first read waits for all U

        isums = pl.run_scoped(issue, *[plgpu.ACC((BO, NT), I32) for _ in range(U)])
        s, e = carry
        for u in range(U):
            scale = d_s[u].astype(F32)[:, None] * dx_s[u][None, :]  # rnd(d · dx)
            s, e = two_sum_add(s, e, opaque(isums[u].astype(F32) * scale, zero))
        return s, e

    zeros = jnp.zeros((BO, NT), F32)
    pipeline = plgpu.emit_pipeline(
        step,
        grid=(steps,),
        in_specs=[
            plgpu.BlockSpec((U, BO, QK), lambda s: (s, 0, 0), transforms=_tiles(interpret)),
            plgpu.BlockSpec((U, NT, QK), lambda s: (s, 0, 0), transforms=_tiles(interpret)),
            plgpu.BlockSpec((U, BO), lambda s: (s, 0)),
            plgpu.BlockSpec((U, NT), lambda s: (s, 0)),
        ],
        max_concurrent_steps=cfg.stages,
        init_carry=(zeros, zeros),
    )
    rows = pl.ds(i * BO, BO)
    s, e = pipeline(w_gmem.at[mat, :, rows], x_gmem.at[g], d_gmem.at[mat, :, rows], dx_gmem.at[g])
    o_smem[...] = s + e
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("groups", "cfg", "interpret"))
def matmul(xq, dx, qb, dT, groups: int = 1, cfg: MosaicConfig = MosaicConfig(), interpret: bool = False, mat=None):
    """xq [N, G*K] int8, dx [N, G*K/32] f32 (N ≤ 4) against repacked planes qb [C?, nb, G*r, 32],
    dT [C?, nb, G*r] (``repack``; an optional leading stack C with ``mat`` the matrix to read)
    → y [N, G*r] f32."""
    n = xq.shape[0]
    if qb.ndim == 3:
        qb, dT = qb[None], dT[None]
    _, nb, out, _ = qb.shape
    k = nb * QK
    if n > MAX_TOKENS or not supported(out, k, groups, cfg):
        raise ValueError(f"q8_0 mosaic kernel: unsupported N={n}, weight {out}x{k}/{groups} groups, {cfg}")
    # Tokens padded to 8 and laid out per group and block: x [G, nb, 8, 32], dx [G, nb, 8].
    xg = jnp.pad(xq, ((0, NT - n), (0, 0))).reshape(NT, groups, nb, QK).transpose(1, 2, 0, 3)
    dxg = jnp.pad(dx, ((0, NT - n), (0, 0))).reshape(NT, groups, nb).transpose(1, 2, 0)
    mat = jnp.zeros((), I32) if mat is None else jnp.asarray(mat, I32)
    small = jnp.stack([jnp.zeros((NT,), I32), jnp.full((NT,), mat, I32)])  # row 0: zeros, row 1: mat
    BO = cfg.block_rows
    yT = plgpu.kernel(
        functools.partial(
            _kernel, cfg=cfg, steps=nb // cfg.blocks_per_step, tiles_per_group=out // groups // BO, interpret=interpret
        ),
        out_type=jax.ShapeDtypeStruct((out, NT), F32),
        scratch_types=[plgpu.SMEM((BO, NT), F32), plgpu.SMEM((2, NT), I32), plgpu.Barrier(num_arrivals=1)],
        grid=(out // BO,),
        grid_names=("rows",),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(qb, xg, dT, dxg, small)
    return yT[:, :n].T
