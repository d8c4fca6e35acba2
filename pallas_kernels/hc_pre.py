"""The hyper-connection pre-mix of decode and the verifier (``ds4jax.model.hc.hc_pre``) in two
launches beside the Sinkhorn's instead of ~8 XLA fusions (the mixer's norm and 24-row dot, its
gates, the streams' weighted sum).

1. ``hc_mix``, programs (token, K slice): the RMS scale from the squares' pairs that the
   ``hc_post`` kernel wrote with H (``squares``), else every program sums the token's squares over
   the whole flattened state itself (64 KB at full size, read from L2 by each); then the rounded
   products of its K slice against the mixer's rows, in double-float per lane; it writes the
   slice's (s, e) pairs a row.
2. ``hc_gates``, a program a token: combines the slices' pairs, then the gates
   (``ds4jax.model.hc_gates``) and x = Σ_s pre_s·H[s], with the kernel's rounding barrier and
   register picks.
3. The Sinkhorn kernel (``pallas_kernels/sinkhorn.py``) on the comb logits. In the gates kernel its
   20 unrolled rounds took Triton 160 s to compile (0.9 s alone: the layouts of the tiles it
   starts from, offline, session 20).

Every sum is a double-float sum rounded once, as ``numerics.asum``; a sum's correctly rounded
value does not depend on its order (almost always), so these are the XLA path's bits.

H200, session 20, a call at N=1 in jit: 16.6 µs (mix 6.6, gates 3.9, Sinkhorn 4.9, the bench's
output concatenation 1.9) against 18.4 µs for XLA's path; latency, not bytes (0.9 MB), sets both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.hc_gates import gates
from ds4jax.model.numerics import chain_sum, dd_sum
from pallas_kernels import sinkhorn as sinkhorn_kernel
from pallas_kernels.common import F32, is_pow2, kernel_zero, opaque, pick, pow2_at_least, two_sum_add
from pallas_kernels.norms import add_squares, scale_from_squares

__all__ = ["hc_pre", "supported"]

ROWS = 8  # mixer rows a register tile (the rows, n(n+2), are 8 a multiple for even n)
# The squares' loop step: 4 steps of 16 KB at full size. The whole row in one step (16384) compiles
# to 59 registers and its 21 loads issued together (offline, pip Triton); untimed on a GPU.
SQ_CHUNK = 4096
MIX_CHUNK = 128  # the products' loop step: 2 x rows x this many live sums
X_CHUNK = 1024  # the streams' sum step
SPLITS = 32  # K slices a token at full size (512 columns a program); fewer on small models
# ... where the mixer reads hc_post's squares (every sublayer but the first): 128 slices of 128
# columns. 8 full-size layers (H200, session 23, one process): 2,330.9 against 2,347.7 µs of kernels
# a step at N=1, 3,460.2 against 3,462.1 in MTP steps that always verify (N=2).
SPLITS_GIVEN = 128
# The gates launch's programs a token, along the streams' columns (the weighted sum x = Σ pre_s H[s]):
# one program walked the 4 × 4096 streams in 4 steps of 16 KB, each waiting for its loads, on one SM
# (3.9 µs a call at N=1, session 20; the timeline's gates, 378 µs a 43-layer step alone, session 32).
# With C programs each recomputes the gates (the slices' pairs from L2: the first stretch of the
# launch, as before) and sums d/C columns in one step. H200, session 35: the pre-mix (mixer + gates)
# 16.93 / 15.39 / 15.11 / 15.31 µs at N=1 with C = 1 / 4 / 8 / 16 (17.52 / 15.98 / 15.46 / 15.87 at
# N=2; call A); 43 layers 8.014 against 8.116 ms a token with C = 8, the same state (call B).
GATE_COLUMNS = 8
# Warps a gates program. Its ~11 sums of 4-16 elements (the slices' pairs, the gates) cross warps
# through shared memory at 4 warps: 21 barriers in 600 instructions (offline, pip Triton 3.6,
# ``step_sass.py``), 1 at one warp. Slower at fewer warps all the same (H200, session 46, 43 layers,
# one process: 7.820 ms a token at 4, 7.860 at 2, 7.944 at 1): each thread's column loads decide it.
GATES_WARPS = 4
WARPS = 8
STAGES = 3  # the loops' loads pipelined


def supported(H: jax.Array, fn: jax.Array) -> bool:
    """H [T, n, d] with n and d powers of two (every loop step then divides), fn [n(n+2), n·d]."""
    if H.ndim != 3:
        return False
    _, n, d = H.shape
    return n >= 2 and is_pow2(n) and is_pow2(d) and n * d >= MIX_CHUNK and fn.shape == (n * (n + 2), n * d)


def splits_for(F: int, most: int | None = None, given: bool = False) -> int:
    """K slices a token: ``most`` (SPLITS, or SPLITS_GIVEN with the squares ``given``), fewer on
    small models (a power of two: a Triton tensor's dim).
    A program summing the squares itself walks at least 4 product steps for that pass; with the
    squares ``given`` (``hc_post``'s) one step is enough (H200, session 22, a post+pre pair at N=1:
    S = 128 14.74 µs against 15.51 at 32, but 15.95 against 15.57 at N=2)."""
    most = most or (SPLITS_GIVEN if given else SPLITS)
    return max(1, min(most, F // ((1 if given else 4) * MIX_CHUNK)))


def _mix_kernel(z_ref, h_ref, fn_ref, *refs, eps, n_rows, slice_k, sq_chunk, given):
    rnd = functools.partial(opaque, zero=z_ref[0])
    F = h_ref.shape[-1]
    if given:  # the squares' pairs from the hc_post kernel that wrote H: [slices, n] a token
        qs_ref, qe_ref, s_ref, e_ref = refs
        scale = scale_from_squares(*dd_sum(qs_ref[0], qe_ref[0], axis=0), F, eps, z_ref[0])
    else:
        s_ref, e_ref = refs
        sq = min(sq_chunk, F)
        z = jnp.zeros((sq,), F32)

        def squares(i, acc):
            return add_squares(*acc, h_ref[0, pl.ds(pl.multiple_of(i * sq, sq), sq)])

        scale = scale_from_squares(*lax.fori_loop(0, F // sq, squares, (z, z)), F, eps, z_ref[0])
    k0 = pl.program_id(1) * slice_k
    G = n_rows // ROWS

    def products(i, acc):
        k = pl.multiple_of(k0 + i * MIX_CHUNK, MIX_CHUNK)
        # the normalised input, as rms_norm rounds it; loaded as [1, chunk], in the weights' layout
        # (a [chunk] load broadcast to the rows took a layout conversion a step)
        y = h_ref[pl.ds(0, 1), pl.ds(k, MIX_CHUNK)] * scale
        out = []
        for g in range(G):
            w = fn_ref[pl.ds(g * ROWS, ROWS), pl.ds(k, MIX_CHUNK)].astype(F32)  # [ROWS, chunk]
            p = rnd(y * w)  # rounded before the TwoSum (no FMA)
            out.append(two_sum_add(*acc[g], p))
        return tuple(out)

    zr = jnp.zeros((ROWS, MIX_CHUNK), F32)
    acc = lax.fori_loop(0, slice_k // MIX_CHUNK, products, tuple((zr, zr) for _ in range(G)))
    RP = s_ref.shape[1]
    lane_group = lax.broadcasted_iota(jnp.int32, (RP // ROWS, ROWS), 0).reshape(RP)
    tile = lambda v: jnp.broadcast_to(v[None, :], (RP // ROWS, ROWS)).reshape(RP)
    s_out = e_out = jnp.zeros((RP,), F32)
    for g, (s, e) in enumerate(acc):
        s8, e8 = dd_sum(s, e)  # [ROWS] the slice's pair a row
        s_out = jnp.where(lane_group == g, tile(s8), s_out)
        e_out = jnp.where(lane_group == g, tile(e8), e_out)
    s_ref[0, :, 0] = s_out
    e_ref[0, :, 0] = e_out


def _gates_kernel(z_ref, s_ref, e_ref, h_ref, sc_ref, b_ref, x_ref, post_ref, c_ref, *, n, hc_eps):
    rnd = functools.partial(opaque, zero=z_ref[0])
    RP = s_ref.shape[1]
    s, e = dd_sum(s_ref[0], e_ref[0])  # [RP]: the slices' pairs combined, then rounded once
    mix = (s + e).reshape(RP // n, n)  # rows of n: pre, post, comb's n rows, padding
    row = lax.broadcasted_iota(jnp.int32, (n, n), 0)
    mix_comb = jnp.zeros((n, n), F32)
    for i in range(n):
        mix_comb = jnp.where(row == i, pick(mix, 0, 2 + i)[None, :], mix_comb)
    scales = (sc_ref[0], sc_ref[1], sc_ref[2])
    base_comb = b_ref[pl.ds(2 * n, n * n)].reshape(n, n)
    pre, post, c = gates(
        pick(mix, 0, 0),
        pick(mix, 0, 1),
        mix_comb,
        scales,
        b_ref[pl.ds(0, n)],
        b_ref[pl.ds(n, n)],
        base_comb,
        hc_eps,
        rnd,
    )

    @pl.when(pl.program_id(1) == 0)  # every column program has the gates; the first writes them
    def _():
        c_ref[0] = c
        post_ref[0, :] = post

    d = x_ref.shape[-1]  # this program's columns: x_ref and h_ref are its column block
    step = min(X_CHUNK, d)

    def streams(j, carry):
        c0 = pl.multiple_of(j * step, step)
        terms = rnd(pre[:, None] * h_ref[0, :, pl.ds(c0, step)])  # [n, step]
        x_ref[0, pl.ds(c0, step)] = chain_sum(terms, 0, pick)
        return carry

    lax.fori_loop(0, d // step, streams, 0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "n_iter",
        "rms_eps",
        "hc_eps",
        "splits",
        "warps",
        "stages",
        "sums",
        "sq_chunk",
        "gate_columns",
        "interpret",
    ),
)
def hc_pre(
    H,
    fn,
    scale,
    base,
    n_iter: int,
    rms_eps: float,
    hc_eps: float,
    squares=None,
    splits=0,
    warps=WARPS,
    stages=STAGES,
    sums=sinkhorn_kernel.SUMS,
    sq_chunk=SQ_CHUNK,
    gate_columns=None,
    interpret=False,
):
    """H [T, n, d] f32, fn [n(n+2), n·d] (f16/f32), scale [3], base [n(n+2)] → (x [T, d],
    post [T, n], comb [T, n, n]), as ``ds4jax.model.hc.hc_pre``. ``squares``: the double-float
    pairs of Σ H² a token from ``pallas_kernels.hc_post`` (([T, S, n], [T, S, n])), or None: the
    mixer sums them itself. ``splits``: K slices a token
    (0: ``splits_for``); ``warps``, ``stages``, ``sq_chunk``: the mixer launch's, ``sums``: the
    Sinkhorn's, ``gate_columns``: the gates launch's programs a token along the streams' columns
    (None: ``GATE_COLUMNS``; each recomputes the gates, the first writes them: they only time)."""
    gate_columns = GATE_COLUMNS if gate_columns is None else gate_columns
    T, n, d = H.shape
    F, R = n * d, fn.shape[0]
    RP = pow2_at_least(R)
    S = splits or splits_for(F, given=squares is not None)
    if sq_chunk & (sq_chunk - 1):
        raise ValueError(f"hc_pre kernel: the squares' step {sq_chunk} must be a power of two")
    if F % (S * MIX_CHUNK) or S & (S - 1):
        raise ValueError(f"hc_pre kernel: {S} slices (a power of two) must divide {F} columns in steps of {MIX_CHUNK}")
    flat = H.reshape(T, F).astype(F32)
    zero = kernel_zero(flat, interpret)
    one = pl.BlockSpec((1,), lambda *_: (0,))
    part = jax.ShapeDtypeStruct((T, RP, S), F32)  # a slice's pairs in a column: the gates reduce along S
    given = tuple(squares) if squares is not None else ()
    sq_specs = [pl.BlockSpec((1, *a.shape[1:]), lambda t, k: (t, 0, 0)) for a in given]
    s, e = pl.pallas_call(
        functools.partial(_mix_kernel, eps=rms_eps, n_rows=R, slice_k=F // S, sq_chunk=sq_chunk, given=bool(given)),
        grid=(T, S),
        in_specs=[one, pl.BlockSpec((1, F), lambda t, k: (t, 0)), pl.BlockSpec((R, F), lambda t, k: (0, 0)), *sq_specs],
        out_specs=[pl.BlockSpec((1, RP, 1), lambda t, k: (t, 0, k))] * 2,
        out_shape=[part, part],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="hc_mix",
    )(zero, flat, fn, *given)
    C = gate_columns if d % gate_columns == 0 and is_pow2(gate_columns) else 1
    whole = lambda a: pl.BlockSpec(a.shape, lambda t, j: (0,) * a.ndim)
    per_token = lambda *shape: pl.BlockSpec((1, *shape), lambda t, j: (t,) + (0,) * len(shape))
    scale, base = scale.astype(F32), base.astype(F32)
    x, post, c = pl.pallas_call(
        functools.partial(_gates_kernel, n=n, hc_eps=hc_eps),
        grid=(T, C),
        in_specs=[
            one,
            per_token(RP, S),
            per_token(RP, S),
            pl.BlockSpec((1, n, d // C), lambda t, j: (t, 0, j)),  # the program's columns of the streams
            whole(scale),
            whole(base),
        ],
        out_specs=[pl.BlockSpec((1, d // C), lambda t, j: (t, j)), per_token(n), per_token(n, n)],
        out_shape=[
            jax.ShapeDtypeStruct((T, d), F32),
            jax.ShapeDtypeStruct((T, n), F32),
            jax.ShapeDtypeStruct((T, n, n), F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=GATES_WARPS, num_stages=2),
        interpret=interpret,
        name="hc_gates",
    )(zero, s, e, H.astype(F32), scale, base)
    return x, post, sinkhorn_kernel.sinkhorn(c, n_iter, hc_eps, sums=sums, interpret=interpret)
