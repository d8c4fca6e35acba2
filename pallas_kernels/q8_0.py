"""Q8_0 matmul with int8 activation blocks, N = 1..4 tokens sharing each weight read.

Numerics (ds4's W8A8 path, MODEL.md §3.2): y[t, o] = Σ_b rnd(isum[t,o,b] · rnd(d[o,b] · dx[t,b]))
with isum the exact int32 dot of the 32-element int8 blocks, summed in double-float (TwoSum)
and rounded once. ``reference`` is that formula in plain jnp (the model's XLA path).

The kernel: one program per (block of output rows, K split); each loop step reads U = 4
consecutive Q8_0 blocks of its rows (128 contiguous bytes per row: one cache line) once for
all tokens. The U block dots of a step come from one int8 tensor-core dot: the activations
are laid out block-diagonally (row t*U + u of ``xd`` keeps only the blocks b ≡ u mod U of
token t), so ``xd_tile @ w_tileᵀ`` is [4*U, rows] of per-block int32 dots, exact. Each (t, u)
row then runs its own TwoSum chain over the blocks u, u+U, ...; the U chains are combined in
order at the end. The token block always has 4 rows (the dot needs 16 rows = 4 tokens × U;
rows past N are masked loads), so a step costs the same at N = 1..4 and one weight read
serves all of them; U and the K split depend only on the weight's shape, so a row's
arithmetic is identical at N = 1..4: the N=2 verifier reproduces N=1 bit for bit. (U = 16 with 512-byte rows, the v3 layout, made the
dot and the live accumulators grow with N: N=4 cost 1.9× N=1; speed-bench/KERNELS.md.) The LM head
alone takes U = 8 (256 B a row a step; tokens padded to at least 2): faster at N = 1 and 2, slower
at N = 4 (``choose_config``).

Grouped (block-diagonal) weights use the same kernel: with ``groups = G`` the weight has
G*r rows over one group's K inputs, x holds the G input slices side by side. Several matrices
of one input (tuples of planes) share one launch: a program's row tile picks its matrix, which
saves a launch's fixed cost (~4 µs on the H200's mid-size matrices) per extra matrix.

``TileConfig.cores`` runs the same block dots on CUDA cores: a step's weight tile as int32
words, ``dp4a`` against each token's words, the 8 words of a block summed in a row, then the
same (token, u) chains. Nothing is padded to 16 token rows there, so its work grows with N: it
wins at N=1 (``dispatch.Q8_CORES_MAX_TOKENS``) and the tensor cores win at N=4. Same order of
the sums, so the same bits: N=1 on CUDA cores still equals N=2 on the tensor cores.
There the loads of ``TileConfig.unroll`` loop steps go out together before their dots (Triton does
not pipeline a loop without a tensor-core dot, so each step had waited for its own loads): 4 steps
(512 B a row in flight) took 4-15 % off the mid-size launches at N=1 (H200, session 34).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import asum, dd_add, quantize_q8_0, rounded
from pallas_kernels.common import (
    F32,
    SplitSums,
    TileConfig,
    by_row_tile,
    byte_words,
    dp4a,
    finished,
    kernel_zero,
    matrix_columns,
    opaque,
    pick,
    pow2_at_least,
    two_sum_add,
)

I32 = jnp.int32
QK = 32  # Q8_0 block
MAX_TOKENS = 4
PAD_TOKENS_FROM_BYTES = 64 << 20  # weights this large take zero-padded tokens, not masked loads


def reference(xq, dx, qs, d, groups: int = 1):
    """Plain-jnp Q8_0 matmul: xq [..., G*K] int8, dx [..., G*K/32] f32, qs [G*r, K] int8, d [G*r, K/32] f16."""
    out, k = qs.shape
    r, nb = out // groups, k // QK
    lead = xq.shape[:-1]
    isum = jnp.einsum(
        "...gbk,gobk->...gob",
        xq.reshape(*lead, groups, nb, QK),
        qs.reshape(groups, r, nb, QK),
        preferred_element_type=I32,
    )
    scale = d.astype(F32).reshape(groups, r, nb) * dx.reshape(*lead, groups, 1, nb)
    return asum(rounded(isum.astype(F32) * scale)).reshape(*lead, out)


def supported(out: int, k: int, groups: int = 1) -> bool:
    """Shapes the kernel takes: whole Q8_0 blocks, rows (and group rows) a multiple of 16."""
    return k % QK == 0 and out % groups == 0 and (out // groups) % 16 == 0


HEAD_ROWS = 65536  # matrices with this many rows and more: the LM head (129280), its own launch shape


def choose_config(
    out: int,
    k: int,
    groups: int = 1,
    n_sm: int = 132,
    blocks_per_step: int | None = None,
    block_rows: int | None = None,
) -> TileConfig:
    """A launch shape from the weight's shape alone (never from N: see the module doc).

    Rows per program, measured (speed-bench/KERNELS.md, v4): 128 for the LM head's 129280 rows,
    64 for the 16–64 MB matrices, 32 below; then the K split doubles until ≥ 2 programs per SM.
    Blocks a step: 4 (128 B a row), 8 (256 B) for the LM head. H200, session 19, the LM head at
    U = 8 against 4: N=1 153 against 167 µs (CUDA cores, 32 rows), N=2 157 against 180, N=4 187
    against 177; the 17-36 MB matrices lose 1.8-2.6 µs at N=2 and 4 at U = 8, so they keep 4."""
    nb = k // QK
    U = blocks_per_step or (8 if out >= HEAD_ROWS else 4)
    while nb % U:
        U //= 2
    r = out // groups
    rows = block_rows or (128 if out >= HEAD_ROWS else 64 if out * k >= (16 << 20) else 32)
    while r % rows:
        rows //= 2
    tiles = out // rows
    splits = 1
    steps = nb // U
    while tiles * splits < 2 * n_sm and steps % (2 * splits) == 0:
        splits *= 2
    return TileConfig(block_rows=rows, k_splits=splits, blocks_per_step=U)


def _kernel(
    z_ref,
    *refs,
    cfg: TileConfig,
    steps: int,
    np_: int,
    n: int,
    quantize: bool,
    stacked: bool,
    tiles: tuple,
    interpret: bool,
):
    sel_ref, refs = (refs[0], refs[1:]) if stacked else (None, refs)
    x_ref, refs = refs[0], refs[1:]
    dx_ref, refs = (None, refs) if quantize else (refs[0], refs[1:])
    n_out = 1 if cfg.k_splits == 1 else 2
    mats, out_refs = [refs[2 * m : 2 * m + 2] for m in range(len(tiles))], refs[-n_out:]
    U, BO = cfg.blocks_per_step, cfg.block_rows
    i, j = pl.program_id(0), pl.program_id(1)
    zero = z_ref[0]
    # Which matrix of a stack (the bench rotates copies through one call site). The engine's
    # calls have no stack and pass no selector (dropping its load changed nothing measurable:
    # shexp_up 6.49 µs a kernel against 6.4, H200, session 16).
    lead = (sel_ref[0],) if stacked else ()
    # Row t*U+u of the block-diagonal activation tile keeps token t's block u of the step.
    blk_of_col = jax.lax.broadcasted_iota(I32, (1, U, U * QK), 2) // QK
    u_of_row = jax.lax.broadcasted_iota(I32, (1, U, U * QK), 1)

    def run_cores(qs_ref, d_ref, tile):
        """The same per-block products and chains on CUDA cores: each row's 128-byte step as 32
        int32 words, four int8 products and their sum per ``dp4a``, 8 of them per block. One
        chain per (token, u) as in ``run``, so the same order and bits; only tokens < n run."""
        rows = pl.ds(tile * BO, BO)

        def load(step):
            """A step's loads: the rows' U blocks and scales, each token's U blocks and scales."""
            # x as [U*32] (loaded as [1, U*32] instead, Triton picked a layout of 254 registers)
            xs = tuple((x_ref[t, pl.ds(step * U * QK, U * QK)], dx_ref[t, pl.ds(step * U, U)]) for t in range(n))
            return qs_ref[(*lead, rows, pl.ds(step * U * QK, U * QK))], d_ref[(*lead, rows, pl.ds(step * U, U))], xs

        def compute(loaded, carry):
            qs, d, xs = loaded
            w = byte_words(qs.astype(I32) & 255)  # [BO, 8U]
            dw = d.astype(F32)  # [BO, U]
            out = []
            for (s, e), (x, dxt) in zip(carry, xs):
                xw = byte_words(x.astype(I32) & 255)[None, :]  # [1, 8U]
                dots = dp4a(w, xw, jnp.int32(0), interpret)
                isum = jnp.sum(dots.reshape(BO, U, QK // 4), axis=-1)  # [BO, U] exact block dots
                out.append(two_sum_add(s, e, opaque(isum.astype(F32) * (dw * dxt[None, :]), zero)))
            return tuple(out)

        zeros = jnp.zeros((BO, U), F32)
        V = cfg.unroll

        def group(g, carry):
            """V steps' loads issued before their dots (the chains' order is the same)."""
            loaded = [load(j * steps + g * V + v) for v in range(V)]
            for v in range(V):
                carry = compute(loaded[v], carry)
            return carry

        chains = jax.lax.fori_loop(0, steps // V, group, ((zeros, zeros),) * n)
        # Each token's U chains combined in order u = 0..U-1 as ``combine`` does, but in the chains'
        # own [BO, U] layout: ``run``'s [np_*U, BO] form cost this program a transpose and a layout
        # conversion (a shared-memory round trip, two barriers) per dd_add (10 of the N=1
        # program's 18 conversions, after its only loads: launches of one wave wait for them).
        return tuple(combine([pick(s, 1, u) for u in range(U)], [pick(e, 1, u) for u in range(U)]) for s, e in chains)

    def run(qs_ref, d_ref, tile):
        rows = pl.ds(tile * BO, BO)

        def body(step, carry):
            s, e = carry
            if quantize:  # f32 activations: this step's U blocks quantized here, by the model's own function
                x, dx = quantize_q8_0(x_ref[:, pl.ds(step * U * QK, U * QK)], lambda v: opaque(v, zero), in_kernel=True)
                dxs = dx.reshape(np_ * U, 1)
            else:
                x = x_ref[:, pl.ds(step * U * QK, U * QK)]  # [N, U*32] int8
                dxs = dx_ref[:, pl.ds(step * U, U)].reshape(np_ * U, 1)
            xd = jnp.where(blk_of_col == u_of_row, x[:, None, :], jnp.int8(0)).reshape(np_ * U, U * QK)
            w = qs_ref[(*lead, rows, pl.ds(step * U * QK, U * QK))]  # [rows, U*32] int8: 128 B per row
            isum = jax.lax.dot_general(xd, w, (((1,), (1,)), ((), ())), preferred_element_type=I32)  # [N*U, rows]
            dt = d_ref[(*lead, rows, pl.ds(step * U, U))].astype(F32).T  # [U, rows]
            dw = jnp.broadcast_to(dt[None], (np_, U, BO)).reshape(np_ * U, BO)
            return two_sum_add(s, e, opaque(isum.astype(F32) * (dw * dxs), zero))

        zeros = jnp.zeros((np_ * U, BO), F32)
        return jax.lax.fori_loop(j * steps, (j + 1) * steps, body, (zeros, zeros))

    def combine(ss, es):
        """A token's U partial chains added in order u = 0..U-1."""
        acc = (ss[0], es[0])
        for u in range(1, U):
            acc = dd_add(acc, (ss[u], es[u]))
        return acc

    def store(rows, acc):
        if n_out == 1:  # no K split: round here
            out_refs[0][rows] = acc[0] + acc[1]
        else:
            out_refs[0][rows] = acc[0]
            out_refs[1][rows] = acc[1]

    if cfg.cores:  # a [BO] pair a token, stored a row each (rows past n: zeros, their outputs are dropped)
        accs = by_row_tile(lambda m, tile: run_cores(*mats[m], tile), tiles, i)  # several matrices of one K
        for t in range(np_):
            store((t, slice(None)), accs[t] if t < n else (jnp.zeros((BO,), F32),) * 2)
        return
    s, e = by_row_tile(lambda m, tile: run(*mats[m], tile), tiles, i)
    # Combine each token's U partial chains in order u = 0..U-1 (a masked sum picks one row: exact).
    s3, e3 = s.reshape(np_, U, BO), e.reshape(np_, U, BO)
    store(Ellipsis, combine([pick(s3, 1, u) for u in range(U)], [pick(e3, 1, u) for u in range(U)]))


# The CUDA-core form's loop steps whose loads go out together (``TileConfig.unroll``; at most the
# steps a program walks). Dispatch reads it at trace time (ab_decode.py variants set it). H200,
# session 34, N=1 launches alone, µs at 1 / 2 / 4 / 8 steps: attn_q_b 13.40 / 13.18 / 12.63 / 15.36,
# attn_output_a 16.59 / 15.15 / 14.45 / 16.02, attn_output_b 16.94 / 15.50 / 14.76 / 16.46,
# mtp_e_proj 9.87 / 9.89 / 9.19, shexp_up 7.37 / 7.42 / 6.71 (64 rows, 4 warps).
CORES_UNROLL = 4
# ... and at N ≥ 2 at most this many, for programs that walk more steps than it (the unroll changes
# no sum, only when loads issue, so N=2 still equals N=1's rows). Launches alone (the K-split
# partials unfinished), H200, session 40 call C, V = 4 / 2 at N=2: attn_q_b (8 steps a program)
# 14.20 / 13.60 µs (N=1: 11.85 at V = 4); mtp_e_proj (4 steps) 9.01 / 9.08, shexp_up (4 steps)
# 5.92 / 6.27 keep 4: they walk no more than 4 steps.
CORES_UNROLL_N2 = 2


def steps_of(nb: int, cfg: TileConfig) -> int:
    """Loop steps a program walks: its split's blocks, U a step."""
    return nb // cfg.blocks_per_step // cfg.k_splits


def config_for(outs: tuple, k: int, groups: int = 1, cores: bool = False, n: int = 1) -> TileConfig:
    """``choose_config`` for one launch over matrices of ``outs`` rows each (one K): the rows per
    program also divide every matrix's rows (rows do not change a result; the K split does, and
    it follows the launch's total shape, never N). ``cores``: the CUDA-core form, the same bits, at
    most 64 rows a program, 32 for the LM head (H200: 175 µs at 64 rows, 187 at 128, session 18;
    at U = 8, 153 at 32 rows and 156 at 64, session 19); its loads of ``CORES_UNROLL`` steps at
    once, ``CORES_UNROLL_N2`` at ``n`` ≥ 2 tokens where a program walks more steps than that."""
    cfg = choose_config(sum(outs), k, groups)
    rows = min(cfg.block_rows, 32 if sum(outs) >= HEAD_ROWS else 64) if cores else cfg.block_rows
    while any(o // groups % rows for o in outs):
        rows //= 2
    unroll, steps = (CORES_UNROLL if cores else 1), steps_of(k // QK, cfg)
    if n >= 2 and steps > CORES_UNROLL:
        unroll = min(unroll, CORES_UNROLL_N2)
    while steps % unroll:
        unroll //= 2
    return dataclasses.replace(cfg, block_rows=rows, cores=cores, unroll=unroll)


@functools.partial(jax.jit, static_argnames=("groups", "cfg", "interpret", "cores", "raw"))
def matmul(
    xq,
    dx,
    qs,
    d,
    groups: int = 1,
    cfg: TileConfig | None = None,
    interpret: bool = False,
    mat=None,
    cores: bool = False,
    raw: bool = False,
):
    """The kernel: xq [N, G*K] int8, dx [N, G*K/32] f32 (N ≤ 4) → y [N, G*r] f32.

    ``qs``/``d`` may be tuples of matrices of one K ([r_m, K] / [r_m, K/32], ungrouped): one
    launch computes them all (the shared expert's gate and up, attn_q_a and attn_kv: one input)
    and returns the tuple of their [N, r_m] outputs. Or a stack [C, G*r, K] / [C, G*r, K/32]
    with ``mat`` the (traced) index of the matrix to use; only that matrix is read. ``dx=None``:
    ``xq`` is the f32 activation [N, G*K] and the kernel quantizes it (``numerics.quantize_q8_0``,
    the same bits), saving the separate quantization kernel.
    ``cores`` (without ``cfg``): the CUDA-core variant of the chosen launch, the same bits.
    ``raw``: each matrix's output as ``SplitSums``, the launch's partials left for the kernel that
    reads them to add."""
    quantize = dx is None
    n = xq.shape[0]
    many = isinstance(qs, (tuple, list))
    qs, d = (tuple(qs), tuple(d)) if many else ((qs,), (d,))
    stacked = qs[0].ndim == 3 or mat is not None
    if stacked:
        qs, d = (qs[0] if qs[0].ndim == 3 else qs[0][None],), (d[0] if d[0].ndim == 3 else d[0][None],)
    k = qs[0].shape[-1]
    outs = tuple(q.shape[-2] for q in qs)
    if many and (groups != 1 or stacked or any(q.shape[-1] != k for q in qs)):
        raise ValueError("q8_0 kernel: several matrices in one launch need one K, no groups and no stack")
    out, nb = sum(outs), k // QK
    cfg = cfg or config_for(outs, k, groups, cores, n)
    U, BO = cfg.blocks_per_step, cfg.block_rows
    if (
        n > MAX_TOKENS
        or not all(supported(o, k, groups) and o // groups % BO == 0 for o in outs)
        or nb % (U * cfg.k_splits)
    ):
        raise ValueError(f"q8_0 kernel: unsupported N={n}, weights {outs}x{k}/{groups} groups, {cfg}")
    if cfg.unroll > 1 and (not cfg.cores or steps_of(nb, cfg) % cfg.unroll):
        raise ValueError(f"q8_0 kernel: {cfg.unroll} steps a group needs the CUDA-core form and a multiple of it")
    if cfg.cores and quantize:
        raise ValueError("q8_0 kernel: the CUDA-core variant takes quantized activations (xq, dx)")
    np_ = pow2_at_least(n) if cfg.cores else max(pow2_at_least(n), 16 // U)  # a tensor-core dot needs ≥ 16 rows
    if np_ > n and not cfg.cores and (U < 4 or out * k >= PAD_TOKENS_FROM_BYTES):
        # K of a few blocks only (tests): pad with zero tokens. At U = 4 (every model shape) the
        # token block reads past row n as masked loads instead (undefined values, which only meet
        # their own rows of the dot and the sums): no pad kernels, −2.2 to −2.8 µs a call at
        # N = 1..3 (run 14, exact on an H200). The outputs keep np_ rows: masked *stores* into
        # the [splits, N, out] partials gave wrong results on the GPU (run 13, KERNELS.md).
        # The LM head pads all the same: masked loads cost it 181.0 µs at N=1 (session 12)
        # against 159.4 with pads (run 14), while the other shapes kept run 14's times.
        xq = jnp.pad(xq, ((0, np_ - n), (0, 0)))
        dx = None if quantize else jnp.pad(dx, ((0, np_ - n), (0, 0)))
    steps = steps_of(nb, cfg)
    tiles_per_group = out // groups // BO
    group_of = lambda i, j: (0, i // tiles_per_group)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    n_out = 1 if cfg.k_splits == 1 else 2
    x_specs = [pl.BlockSpec((np_, k), group_of)] + ([] if quantize else [pl.BlockSpec((np_, nb), group_of)])
    sel = [jnp.asarray(0 if mat is None else mat, I32).reshape(1)] if stacked else []
    planes = [a for pair in zip(qs, d) for a in pair]
    res = pl.pallas_call(
        functools.partial(
            _kernel,
            cfg=cfg,
            steps=steps,
            np_=np_,
            n=n,
            quantize=quantize,
            stacked=stacked,
            tiles=tuple(o // BO for o in outs),
            interpret=interpret,
        ),
        grid=(out // BO, cfg.k_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (0,)),
            *[pl.BlockSpec((1,), lambda i, j: (0,))] * len(sel),
            *x_specs,
            *map(whole, planes),
        ],
        out_specs=[pl.BlockSpec((None, np_, BO), lambda i, j: (j, 0, i))] * n_out,
        out_shape=[jax.ShapeDtypeStruct((cfg.k_splits, np_, out), F32)] * n_out,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="q8_0_share",
    )(kernel_zero(xq if quantize else dx, interpret), *sel, xq, *([] if quantize else [dx]), *planes)
    cols = matrix_columns(outs)
    if raw:
        sums = tuple(SplitSums(tuple(res), start, o, n) for start, o in cols)
        return sums if many else sums[0]
    y = finished(res)[:n]
    return tuple(y[:, start : start + o] for start, o in cols) if many else y
