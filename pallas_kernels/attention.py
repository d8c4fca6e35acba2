"""The decode step's attention sums (``ds4jax.model.attention.sink_attention`` at N = 1..4) as
two launches and an elementwise epilogue, instead of XLA's fusions.

Keys come as f16 tables with the rows each token sees: a part is (table [R, hd], rows [T, K] or
None for "all R rows, shared by the tokens", visible [T, K]). The indexer's rows are read from the
compressed table by index, so nothing is gathered into an f32 copy first. Each part's keys are cut
into blocks of ``KEYS`` rows, padded to whole splits (padded keys invisible).

1. ``attn_scores``, programs (token, head block, key block): each (head, key) score is the
   double-float sum over the head dim of the rounded products q·k, times the scale, -inf where
   the key is not visible.
2. ``attn_mix``, programs (token, head block, head-dim block, split): with m = max(sink, every
   score) (one XLA reduction, which the epilogue shares), e = exp(s - m) over the split's keys
   into the denominator's and the mix's double-float sums; the (s, e) pairs are written
   unrounded. Splitting the keys is what gives the launch enough programs (H200, session 21, the
   raw window and the indexer's 512 rows at N=1; XLA's path 45.4 µs): one program a head block
   walking every key took 139.6 µs; key splits with the max in each program and a finish kernel
   53-67 µs; the max and the epilogue in XLA 52-59 µs; then 32 columns and 4 warps 36.9 µs.
3. ``_epilogue`` (XLA, elementwise, fuses with its neighbours): each part's split pairs added in
   split order and rounded once, the parts added in order, the denominator's pairs likewise plus
   exp(sink - m), then the reciprocal multiply, as the reference does.

Every sum is a double-float sum rounded once, as ``numerics.asum``, so the bits are the XLA
path's wherever those sums round correctly (the same premise as every other double-float kernel).

With ``quant_rotated`` (the decode step's form) the epilogue is a launch too, ``attn_out``, that
goes on to the output projection's input: the output's tail inverse-rotated (``rope.apply_rope_tail``)
and quantized per 32 (``numerics.quantize_q8_0``), where XLA ran the epilogue, the rotation and
the quantization as ~5 kernels a layer (H200, session 28: 2.5 kernels of epilogue, ~3.4 µs a
layer, besides the rotation's and the quantize launch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import dd_sum, div, exp, quantize_q8_0, rounded
from pallas_kernels.common import F32, finish, is_pow2, kernel_zero, opaque, two_sum_add
from pallas_kernels.norms import rotate_tail_slice

__all__ = ["out_supported", "sink_attention", "supported"]

HEADS = 8  # heads a program
KEYS = 16  # keys a block (the scores launch's program, the mix loop's step)
SPLIT = None  # key blocks a mix program walks; None: ``choose_split`` (from the key count)
# H200, session 21 (calls E-F, N=1, the launches alone): 32 columns and 4 warps beat 64 and 8, and
# 16 columns or 2 warps, for both launches: 39.1 against 52.2 µs (the indexer's keys, split 8).
D_CHUNK = 32  # head-dim columns a step of the scores' loop, and a mix program's columns
WARPS = 4
# Each loop step's loads issued a step ahead (None: at T >= 2 only). H200, session 22, a launch
# pair (ratio-4 keys / ratio-128 keys, µs): N=1 36.1 -> 35.7 / 23.0 -> 23.6; N=2 62.6 -> 60.4 /
# 34.8 -> 31.4; N=4 112.7 -> 111.1 / 59.2 -> 53.5. Predicted -20 to -30 %: the launches are bound
# by their double-float adds at low occupancy (Nsight Compute: FADD 65 % of the scores'
# instructions, 25 % theoretical occupancy by registers, 0.73 waves), not by waiting on loads.
PREFETCH = None
# Skip the key blocks no key of which is visible: the scores launch writes their -inf without the
# sums and a flag a block, and each mix program stops after its split's last live block. Same bits (the skipped keys'
# terms are exact zeros); what it saves grows with the cache's rows past the token (the raw
# window's padding to whole splits, a long context's compressed rows not yet written). H200,
# session 47, 43 layers, 2,048 tokens filled, one process each (with the indexer's skip): a 32,768-token
# context 9.779 -> 8.980 ms a token; a 4,096-token one 10,743.6 -> 10,702.7 µs of kernels a step,
# wall 7.783 -> 7.888 median (min 7.781 -> 7.793: within the rounds' spread); the same end states.
# The trip count from the flags rather than from each mix program's own reduction over its split's
# scores (the 16 column programs of one split made the same 256 × 8 reduction each): H200, session
# 48, 43 layers, 2,048 tokens filled, 10,685.6 -> 10,676.5 µs of kernels a step at a 4,096-token
# context (wall 7.744 -> 7.743 ms), 11,850.8 -> 11,826.9 at 32,768 (8.901 -> 8.880).
SKIP_UNSEEN = True
I32 = jnp.int32


def supported(q: jax.Array, parts) -> bool:
    """q [T, H, hd] with H a multiple of HEADS and hd of D_CHUNK (powers of two); one or two parts
    (table [R, hd], rows [T, K] int or None, visible [T, K or R])."""
    if q.ndim != 3 or not 1 <= len(parts) <= 2:
        return False
    T, H, hd = q.shape
    for tab, rows, vis in parts:
        K = _n_keys(tab, rows)
        if tab.ndim != 2 or tab.shape[1] != hd or vis.shape != (T, K):
            return False
        if rows is not None and rows.shape != (T, K):
            return False
    return is_pow2(H) and is_pow2(hd) and H % HEADS == 0 and hd % D_CHUNK == 0


def _n_keys(tab, rows) -> int:
    """Keys a token sees in a part: the table's rows, or the rows it reads by index."""
    return tab.shape[0] if rows is None else rows.shape[-1]


def choose_split(parts) -> int:
    """Key blocks a mix program walks, from the key count alone (H200, session 21, N=1): 16 for the
    raw window with the indexer's 512 rows (36.9 µs against 39.1 at 8 and 44.2 at 4), 4 for the
    raw window with a few dozen ratio-128 rows (22.9 µs against 26.2 at 8)."""
    n_keys = sum(_n_keys(tab, rows) for tab, rows, _ in parts)
    return 16 if n_keys >= 512 else 4


def _layout(parts, split):
    """Static per-part (first block, blocks) with each part padded to whole splits."""
    spans, b0 = [], 0
    for tab, rows, _ in parts:
        nb = -(-_n_keys(tab, rows) // (KEYS * split)) * split
        spans.append((b0, nb))
        b0 += nb
    return tuple(spans), b0


def _pick(parts_fn, n_parts, blk, spans):
    """Run ``parts_fn(p)`` for the part that key block ``blk`` lies in (a uniform branch a program)."""
    if n_parts == 1:
        return parts_fn(0)
    return lax.cond(blk < spans[1][0], lambda: parts_fn(0), lambda: parts_fn(1))


def _rows(p, t, k0, n, row_refs, n_rows):
    """Table rows of part p's local keys k0 .. k0 + n - 1 for token t: [n], clamped into the table
    (padded and invisible keys read a real row; their e is 0)."""
    if row_refs[p] is None:
        r = k0 + lax.broadcasted_iota(I32, (n,), 0)
    else:
        r = row_refs[p][t, pl.ds(pl.multiple_of(k0, n), n)]
    return jnp.clip(r, 0, n_rows[p] - 1)


def _split_refs(refs, n_parts, shared):
    """(tables, row refs with None for shared parts, rest)."""
    tabs, rest = refs[:n_parts], refs[n_parts:]
    row_refs = []
    for p in range(n_parts):
        if shared[p]:
            row_refs.append(None)
        else:
            row_refs.append(rest[0])
            rest = rest[1:]
    return tabs, row_refs, rest


def _loop(n, load, body, acc, prefetch):
    """``acc = body(acc, load(i))`` for i < n. With ``prefetch`` the loads of step i + 1 are issued
    before step i's sums and carried by the loop (Triton 3.6 pipelined no loads that feed no dot,
    so a plain loop waits for each step's loads; the last step reloads its own tiles)."""
    if not prefetch:
        return lax.fori_loop(0, n, lambda i, a: body(a, load(i)), acc)

    def step(i, carry):
        a, tiles = carry
        return body(a, tiles), load(jnp.minimum(i + 1, n - 1))

    return lax.fori_loop(0, n, step, (acc, load(0)))[0]


def _scores_kernel(z_ref, q_ref, *refs, scale, spans, shared, n_rows, n_keys, hd, dc, prefetch):
    rnd = functools.partial(opaque, zero=z_ref[0])
    t, blk = pl.program_id(0), pl.program_id(2)
    vis_refs, refs = refs[: len(spans)], refs[len(spans) :]
    tabs, row_refs, outs = _split_refs(refs, len(spans), shared)
    o_ref = outs[0]
    cols = lax.broadcasted_iota(I32, (1, 1, dc), 2)
    z = jnp.zeros((HEADS, KEYS, dc), F32)

    def first_key(p):
        return (blk - spans[p][0]) * KEYS

    def seen(p):
        # the part's visibility [T·K] read at the block's keys (its padded keys are invisible)
        k = first_key(p) + lax.broadcasted_iota(I32, (KEYS,), 0)
        K = n_keys[p]
        return jnp.where(k < K, vis_refs[p][t * K + jnp.clip(k, 0, K - 1)], 0)

    def sums(p):
        base = _rows(p, t, first_key(p), KEYS, row_refs, n_rows)[None, :, None] * hd + cols

        def load(c):
            c0 = c * dc if isinstance(c, int) else pl.multiple_of(c * dc, dc)  # the prefetch's first: static
            # q [HEADS, 1, D], loaded in the product's layout; the key rows [1, KEYS, D] gathered
            return q_ref[0, :, :, pl.ds(c0, dc)], tabs[p][base + c0]

        def step(acc, tiles):
            qc, kc = tiles
            return two_sum_add(*acc, rnd(qc * kc.astype(F32)))  # products rounded first (no FMA)

        return _loop(hd // dc, load, step, (z, z), prefetch)

    vis = _pick(seen, len(spans), blk, spans)

    def write():
        s, e = dd_sum(*_pick(sums, len(spans), blk, spans))  # [HEADS, KEYS]
        o_ref[0] = jnp.where(vis[None, :] != 0, rnd((s + e) * scale), -jnp.inf)

    if not SKIP_UNSEEN:
        write()
        return
    # A block none of whose keys is visible (a part's padding, a cache's rows past the token): its
    # scores are -inf without the sums, and the mix's trip count leaves it out.
    live = jnp.max(vis) != 0
    outs[1][0, 0, :] = jnp.full((1,), live.astype(I32))  # the block's flag for the mix's trip count
    pl.when(live)(write)

    @pl.when(jnp.logical_not(live))
    def _():
        o_ref[0] = jnp.full((HEADS, KEYS), -jnp.inf, F32)


def _mix_kernel(z_ref, m_ref, s_ref, *refs, spans, shared, n_rows, hd, split, dc, prefetch, flags):
    rnd = functools.partial(opaque, zero=z_ref[0])
    t, c, sp = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    if flags:
        live_ref, refs = refs[0], refs[1:]
    tabs, row_refs, (ms_ref, me_ref, ds_ref, de_ref) = _split_refs(refs, len(spans), shared)
    m = m_ref[0]  # [HEADS]: max(sink, every score), from XLA (one reduction, shared with the epilogue)
    cols = lax.broadcasted_iota(I32, (1, 1, dc), 2) + c * dc
    n = KEYS  # keys a step: the live sums are 2 x HEADS x n x D_CHUNK (8 keys lost: 44.5 against 36.9 µs)
    zd = jnp.zeros((HEADS, n, 1), F32)
    zm = jnp.zeros((HEADS, n, dc), F32)

    def part(p):
        def load(j):
            k0 = pl.multiple_of(sp * split * KEYS + j * n, n)  # in the scores row
            rows = _rows(p, t, k0 - spans[p][0] * KEYS, n, row_refs, n_rows)
            return s_ref[0, :, pl.ds(k0, n), :], tabs[p][rows[None, :, None] * hd + cols]  # [HEADS, n, 1], [1, n, D]

        def step(carry, tiles):
            (den, mix), (sc, k) = carry, tiles
            e = exp(sc - m[:, None, None], rnd)  # 0 where masked
            return two_sum_add(*den, e), two_sum_add(*mix, rnd(e * k.astype(F32)))

        return _loop(steps, load, step, ((zd, zd), (zm, zm)), prefetch)

    steps = split * KEYS // n
    if flags:
        # Up to the split's last block with a visible key: the blocks after it hold -inf scores
        # only, whose terms e = exp(-inf - m) = 0 and 0·k are exact no-ops (finite keys), so leaving
        # them out keeps the bits. n = KEYS, so a block is a step.
        live = live_ref[0, 0, pl.ds(pl.multiple_of(sp * split, split), split)]
        steps = jnp.max(jnp.where(live != 0, lax.broadcasted_iota(I32, (split,), 0) + 1, 0))

    den, mix = _pick(part, len(spans), sp * split, spans)
    ms_ref[0, 0], me_ref[0, 0] = dd_sum(*mix, axis=1)  # [HEADS, D], unrounded
    ds, de = dd_sum(*den, axis=1)  # [HEADS, 1]
    ds_ref[0, 0, 0], de_ref[0, 0, 0] = ds[:, 0], de[:, 0]


def _epilogue(m, sink, mix_s, mix_e, den_s, den_e, spans, split, rnd=rounded):
    """The output from the mix launch's split pairs: each part's pairs in split order, rounded once,
    the parts added in order; the denominator's pairs likewise plus exp(sink - m); then the
    reference's reciprocal multiply. On arrays (XLA's elementwise epilogue, which fuses with its
    neighbours: mix [S, T, H, hd], den [S, T, H]), or on an ``attn_out`` program's refs (mix
    [S, HB, C], den [S, HB] blocks; ``rnd`` its barrier)."""
    o = None
    for b0, nb in spans:
        mix = finish(mix_s, mix_e, range(b0 // split, (b0 + nb) // split))
        o = mix if o is None else o + mix
    total = exp(sink - m, rnd) + finish(den_s, den_e)
    return o * div(1.0, total, rnd)[..., None]


OUT_HEADS = 4  # heads a program of the ``attn_out`` launch
OUT_COLS = 128  # head-dim columns a program of it (whole Q8_0 blocks; the tail's pairs stay together)


def _out_kernel(z_ref, m_ref, sink_ref, ms_ref, me_ref, ds_ref, de_ref, cos_ref, sin_ref, q_ref, d_ref, **kw):
    """``_epilogue``, then the tail's inverse rotation and the Q8_0 quantization of a [heads, cols]
    tile: the same functions as the XLA path's, in its order."""
    rnd = functools.partial(opaque, zero=z_ref[0])
    y = _epilogue(m_ref[...], sink_ref[...], ms_ref, me_ref, ds_ref, de_ref, kw["spans"], kw["split"], rnd)
    t, cc = pl.program_id(0), pl.program_id(2)
    y = rotate_tail_slice(y, cos_ref, sin_ref, t, cc, kw["hd"], kw["n_pairs"], rnd, inverse=True)
    q, d = quantize_q8_0(y, rnd, in_kernel=True)
    q_ref[...] = q
    d_ref[...] = d


def out_supported(q: jax.Array, cos: jax.Array) -> bool:
    """The ``attn_out`` launch: whole programs of heads and columns, the rotated tail inside the head."""
    T, H, hd = q.shape
    return H % OUT_HEADS == 0 and hd % OUT_COLS == 0 and 0 < 2 * cos.shape[-1] <= hd and cos.shape[0] == T


def _out_quant(m, sink, mix_s, mix_e, den_s, den_e, cos, sin, spans, split, interpret):
    """(q int8 [T, H, hd], d f32 [T, H, hd/32]): ``quantize_q8_0`` of the inverse-rotated ``_epilogue``."""
    n_split, T, H, hd = mix_s.shape
    HB, C, P = OUT_HEADS, OUT_COLS, cos.shape[-1]
    mix = pl.BlockSpec((n_split, None, HB, C), lambda t, h, c: (0, t, h, c))
    den = pl.BlockSpec((n_split, None, None, HB), lambda t, h, c: (0, t, 0, h))  # column block 0's
    flat = pl.BlockSpec((T * P,), lambda *_: (0,))
    kw = {"spans": spans, "split": split, "hd": hd, "n_pairs": P}
    return pl.pallas_call(
        functools.partial(_out_kernel, **kw),
        grid=(T, H // HB, hd // C),
        in_specs=[
            pl.BlockSpec((1,), lambda *_: (0,)),
            pl.BlockSpec((None, HB), lambda t, h, c: (t, h)),
            pl.BlockSpec((HB,), lambda t, h, c: (h,)),
            mix,
            mix,
            den,
            den,
            flat,
            flat,
        ],
        out_specs=[
            pl.BlockSpec((None, HB, C), lambda t, h, c: (t, h, c)),
            pl.BlockSpec((None, HB, C // 32), lambda t, h, c: (t, h, c)),
        ],
        out_shape=[jax.ShapeDtypeStruct((T, H, hd), jnp.int8), jax.ShapeDtypeStruct((T, H, hd // 32), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="attn_out",
    )(kernel_zero(m, interpret), m, sink, mix_s, mix_e, den_s, den_e, cos.reshape(-1), sin.reshape(-1))


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "split", "warps", "stages", "dc", "prefetch"))
def sink_attention(
    q,
    parts,
    sink,
    scale: float,
    interpret: bool = False,
    split: int | None = SPLIT,
    warps: int = WARPS,
    stages: int = 2,
    dc: int = D_CHUNK,
    prefetch: bool | None = PREFETCH,
    quant_rotated=None,
):
    """q [T, H, hd] f32; ``parts``: ((table [R, hd], rows [T, K] or None, visible [T, K]), ...);
    sink [H]; ``scale`` a static f32 → [T, H, hd], as ``ds4jax.model.attention.sink_attention``
    over the keys table[rows] (K = V). ``split``: key blocks a mix program walks (None: from the key
    count), ``dc`` head-dim columns a step of the scores and a mix program's; ``warps``, ``stages`` the launches'; ``prefetch``: each loop
    step's loads issued a step ahead (None: at T >= 2). Only time depends on these.
    ``quant_rotated`` (cos, sin [T, n_rot/2]; ``out_supported``): returns (that output, (q, d)),
    (q, d) the Q8_0 quantization ([T, H, hd] int8, [T, H, hd/32]) of the output with its tail
    inverse-rotated by those angles, from the ``attn_out`` launch."""
    T, H, hd = q.shape
    zero = kernel_zero(q, interpret)
    q = q.astype(F32)
    split = split or choose_split(parts)
    prefetch = T >= 2 if prefetch is None else prefetch
    spans, n_blocks = _layout(parts, split)
    shared = tuple(rows is None for _, rows, _ in parts)
    n_rows = tuple(int(tab.shape[0]) for tab, _, _ in parts)
    tabs = [tab.reshape(-1) for tab, _, _ in parts]  # flat: rows are gathered by offset
    rows = []
    for (_, r, _), (_, nb) in zip(parts, spans):
        if r is not None:
            rows.append(jnp.pad(r.astype(I32), ((0, 0), (0, nb * KEYS - r.shape[1]))))
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
    one = pl.BlockSpec((1,), lambda *_: (0,))
    params = plgpu.CompilerParams(num_warps=warps, num_stages=stages)
    static = {"spans": spans, "shared": shared, "n_rows": n_rows, "hd": hd, "dc": dc, "prefetch": prefetch}
    Rk = n_blocks * KEYS

    # Each part's visibility as it is, flat [T·K] (the kernel reads it at its keys): padding and
    # concatenating them into one [T, blocks·KEYS] array cost XLA 2-3 kernels a layer (H200, session
    # 29: 143.9 µs and 109 kernels a 43-layer step).
    vis = [v.astype(I32).reshape(-1) for _, _, v in parts]
    n_keys = tuple(int(v.shape[1]) for _, _, v in parts)
    scale = float(np.float32(scale))  # a literal: exact in f32
    flags = SKIP_UNSEEN  # the scores launch's per-block flags, the mix's trip count
    out = pl.pallas_call(
        functools.partial(_scores_kernel, scale=scale, n_keys=n_keys, **static),
        grid=(T, H // HEADS, n_blocks),
        in_specs=[
            one,
            pl.BlockSpec((1, HEADS, 1, hd), lambda t, h, b: (t, h, 0, 0)),
            *[whole(a) for a in vis + tabs + rows],
        ],
        out_specs=[
            pl.BlockSpec((1, HEADS, KEYS), lambda t, h, b: (t, h, b)),
            *([pl.BlockSpec((1, 1, 1), lambda t, h, b: (t, h, b))] if flags else []),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((T, H, Rk), F32),
            *([jax.ShapeDtypeStruct((T, H // HEADS, n_blocks), I32)] if flags else []),
        ],
        compiler_params=params,
        interpret=interpret,
        name="attn_scores",
    )(zero, q.reshape(T, H, 1, hd), *vis, *tabs, *rows)
    scores, live = out if flags else (out[0], None)

    n_split, n_c = n_blocks // split, hd // dc
    sink = sink.astype(F32)
    m = jnp.maximum(jnp.max(scores, axis=-1), sink[None, :])  # [T, H]: exact in any order
    mix_shape = jax.ShapeDtypeStruct((n_split, T, H, hd), F32)
    # every column block's programs sum the same denominator; each writes its own copy (no two
    # programs write one block) and the epilogue reads column block 0's
    den_shape = jax.ShapeDtypeStruct((n_split, T, n_c, H), F32)
    mix_spec = pl.BlockSpec((1, 1, HEADS, dc), lambda t, h, c, s: (s, t, h, c))
    den_spec = pl.BlockSpec((1, 1, 1, HEADS), lambda t, h, c, s: (s, t, c, h))
    mix_s, mix_e, den_s, den_e = pl.pallas_call(
        functools.partial(_mix_kernel, split=split, flags=flags, **static),
        grid=(T, H // HEADS, n_c, n_split),
        in_specs=[
            one,
            pl.BlockSpec((1, HEADS), lambda t, h, *_: (t, h)),
            # the mix loads [HEADS, KEYS, 1] tiles: the products' layout
            pl.BlockSpec((1, HEADS, Rk, 1), lambda t, h, *_: (t, h, 0, 0)),
            *([pl.BlockSpec((1, 1, n_blocks), lambda t, h, *_: (t, h, 0))] if flags else []),
            *[whole(a) for a in tabs + rows],
        ],
        out_specs=[mix_spec, mix_spec, den_spec, den_spec],
        out_shape=[mix_shape, mix_shape, den_shape, den_shape],
        compiler_params=params,
        interpret=interpret,
        name="attn_mix",
    )(zero, m, scores.reshape(T, H, Rk, 1), *([live] if flags else []), *tabs, *rows)
    o = _epilogue(m, sink[None, :], mix_s, mix_e, den_s[:, :, 0], den_e[:, :, 0], spans, split)
    if quant_rotated is None:
        return o
    return o, _out_quant(m, sink, mix_s, mix_e, den_s, den_e, *quant_rotated, spans, split, interpret)
