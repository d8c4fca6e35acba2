"""Routed-expert matmuls on K/IQ planes with Q8_K activations: IQ2_XXS, Q2_K, Q4_K.

Numerics (ds4's CPU path, MODEL.md §3.3-3.5): per 256-element super-block the integer
dot of each sub-block with the int8 activations is exact, weighted by the integer
sub-block scales; the block value is scaled by d (and the K-quants' min term by dmin)
times the activation block scale; blocks are summed in double-float and rounded once.
``reference`` is that in plain jnp over gathered experts (the model's XLA path).

The kernel reads only the selected experts' planes: one program per (pair, block of
output rows, K split), where a pair is (token, expert slot) with its own activation row and
expert id; the expert id picks the plane rows by computed offsets, so nothing is gathered. The
weights are decoded to integers in registers (2/4-bit fields; IQ2_XXS grid lookups and
parity-completed sign bits) and dotted on CUDA cores: v3 (the default) four at a time with
``dp4a`` on packed int8 words, v1 element by element. Each output's TwoSum chain runs over its
split's super-blocks in order and the splits' partial sums are combined in order; the split
comes from the weight's shape, so a pair's result is the same whatever N is. Matrices of one
shape with the same input (gate and up) share one launch.

Whole-K programs (``ExpertConfig.whole_k``, the default on int8 input where the super-blocks are a
power of two): one program per (pair, block of rows) holds every super-block of its rows as a tensor
axis, so all its loads go out before the first dot (16-32 rows × 8-16 super-blocks: 20-70 KB in
flight a program, where a split program walked 1-4 super-blocks one load at a time); it then runs
each split's TwoSum chain and adds the splits in order as ``finish`` does, so the bits are the split
launch's and no partials leave the launch. H200, session 34: the nibbles' gate+up 23.8 -> 18.9 µs at
N=1 (69 % of copy), Q2_K down 12.5 -> 10.8, IQ2_XXS gate+up 34.2 -> 27.6, Q4_K 26.3 -> 21.1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import asum, dd_add, quantize_q8_k, rounded
from ds4jax.quant.formats import QType
from ds4jax.quant.layouts import IQ2_NIB, iq2_nib_ints, iq2_xxs_ints
from ds4jax.quant.tables import IQ2XXS_GRID_I8
from pallas_kernels.common import (
    F32,
    SplitSums,
    byte_words,
    dp4a,
    finish,
    iq2_sign_masks,
    is_pow2,
    kernel_zero,
    nib_bytes,
    opaque,
    pick,
    two_sum_add,
)

I32 = jnp.int32
QK_K = 256
Q2_K, Q4_K, IQ2_XXS = QType.Q2_K, QType.Q4_K, QType.IQ2_XXS  # the planes' qtype (GGML ids)
TYPES = (Q2_K, Q4_K, IQ2_XXS)
GRID = IQ2XXS_GRID_I8  # IQ2_XXS magnitudes [256, 8], row = grid index

# IQ2_XXS repacked at load time (``ds4jax.quant.layouts``): a word of 4 weights decodes in one
# ``prmt`` (a byte select from an 8-byte table by 4 nibble selectors): no table gathers, no
# parity, no sign masks. IQ2_XXS is issue-bound at 16-18 % of the copy bandwidth (~25 integer ops
# and 2 gathers a group of 8).
LAYOUTS = (IQ2_NIB,)
_NIB_TABLE = (0x002B1908, 0x00D5E7F8)  # bytes 8, 25, 43, 0 | -8, -25, -43, 0 (prmt's a, b)
_IQ2 = (IQ2_XXS, IQ2_NIB)  # w = d (2 ls + 1) / 8 · magnitude · sign: no min term


# ---- reference --------------------------------------------------------------------
def _int_weights(qtype: int, p: dict):
    """Integer view of K/IQ planes: (q int8 [.., nb, S, L], per-sub-block scale, per-sub-block min)."""
    if qtype == Q2_K:
        qs = p["qs"]
        lead = qs.shape[:-1]
        shift = jnp.array([0, 2, 4, 6], jnp.uint8).reshape(4, 1)
        vals = ((qs.reshape(lead + (2, 1, 32)) >> shift) & 3).reshape(lead + (16, 16))
        return vals.astype(jnp.int8), (p["sc"] & 15).astype(I32), (p["sc"] >> 4).astype(I32)
    if qtype == Q4_K:
        qs = p["qs"]
        lead = qs.shape[:-1]
        shift = jnp.array([0, 4], jnp.uint8).reshape(2, 1)
        vals = ((qs.reshape(lead + (4, 1, 32)) >> shift) & 15).reshape(lead + (8, 32))
        return vals.astype(jnp.int8), p["sc"].astype(I32), p["m"].astype(I32)
    if qtype == IQ2_XXS:
        vals, sc = iq2_xxs_ints(p)
        return vals, sc, None
    if qtype == IQ2_NIB:
        vals, sc = iq2_nib_ints(p)
        return vals, sc, None
    raise NotImplementedError(f"expert matmul for GGML type {qtype}")


def reference(xq, dx, qtype: int, planes: dict, ids=None, rnd=rounded):
    """Σ_i W[..., o, i] x[..., i]: xq int8 [..., n], dx [..., n/256]; planes [..., out, nb, ...]
    with the same leading dims as x (after broadcasting), e.g. gathered experts [T, k, out, ...].
    With ``ids`` the planes hold all experts [E, out, ...] and the experts ``ids`` are gathered.
    ``rnd`` forces a product's rounding (``numerics.rounded_in_loop`` inside a loop body)."""
    if ids is not None:
        planes = {name: jnp.take(p, ids, axis=0) for name, p in planes.items()}
    vals, sc, mn = _int_weights(qtype, planes)  # vals [..., out, nb, S, L]
    S, L = vals.shape[-2:]
    nb = vals.shape[-3]
    xb = xq.reshape(*xq.shape[:-1], nb, S, L)
    sub = jnp.einsum("...bsl,...obsl->...obs", xb, vals, preferred_element_type=I32)  # exact
    isum = jnp.sum(sub * sc, axis=-1)  # [..., out, nb]
    d = planes["d"].astype(F32)
    dxb = dx[..., None, :]
    if mn is None:  # IQ2_XXS (and its nibble layout): w = d * (2 ls + 1) / 8 * grid * sign
        blk = (d * dxb) * F32(0.125) * isum.astype(F32)
    else:  # K-quants: w = d * sc * q - dmin * m; the min term uses the activation block sums
        bsum = jnp.sum(xb.astype(I32), axis=-1)  # [..., nb, S]
        msum = jnp.sum(bsum[..., None, :, :] * mn, axis=-1)  # [..., out, nb]
        dmin = planes["dmin"].astype(F32)
        blk = rnd((d * dxb) * isum.astype(F32)) - rnd((dmin * dxb) * msum.astype(F32))
    return asum(rnd(blk))


# ---- kernel -------------------------------------------------------------------------
def _isum_q4k(x_ref, p, b, planes, sel):
    qs_ref, sc_ref, m_ref = planes["qs"], planes["sc"], planes["m"]
    e, rows = sel
    # x viewed [P, nb, 4, 2, 32]: sub-block j = 2h + parity sits in the low (even) / high nibble.
    xe = x_ref[p, b, :, 0, :].astype(I32)  # [4, 32] even sub-blocks
    xo = x_ref[p, b, :, 1, :].astype(I32)
    q = qs_ref[e, rows, b, :].reshape(-1, 4, 32).astype(I32)  # [BO, 4, 32] bytes
    sub_e = jnp.sum((q & 15) * xe[None], axis=-1)  # [BO, 4]
    sub_o = jnp.sum((q >> 4) * xo[None], axis=-1)
    sc = sc_ref[e, rows, b, :].reshape(-1, 4, 2).astype(I32)  # [BO, 4, 2]: (h, parity)
    mn = m_ref[e, rows, b, :].reshape(-1, 4, 2).astype(I32)
    sce, sco = pick(sc, 2, 0), pick(sc, 2, 1)
    mne, mno = pick(mn, 2, 0), pick(mn, 2, 1)
    isum = jnp.sum(sub_e * sce + sub_o * sco, axis=-1)
    msum = jnp.sum(jnp.sum(xe, -1)[None] * mne + jnp.sum(xo, -1)[None] * mno, axis=-1)
    return isum, msum


def _isum_q2k(x_ref, p, b, planes, sel):
    qs_ref, sc_ref = planes["qs"], planes["sc"]
    e, rows = sel
    # element 128h + 32j + l = bits 2j of byte 32h + l; sub-block 8h + 2j + l//16.
    q = qs_ref[e, rows, b, :].reshape(-1, 2, 2, 16).astype(I32)  # [BO, h, half, 16]
    sc = sc_ref[e, rows, b, :].reshape(-1, 2, 4, 2).astype(I32)  # [BO, h, j, half]
    isum = 0
    msum = 0
    for j in range(4):
        xj = x_ref[p, b, :, j, :].reshape(2, 2, 16).astype(I32)  # x viewed [P, nb, 2, 4, 32]
        sub = jnp.sum(((q >> (2 * j)) & 3) * xj[None], axis=-1)  # [BO, 2, 2]
        scj = pick(sc, 2, j)  # [BO, 2, 2]
        isum = isum + jnp.sum(jnp.sum(sub * (scj & 15), -1), -1)
        msum = msum + jnp.sum(jnp.sum(jnp.sum(xj, -1)[None] * (scj >> 4), -1), -1)
    return isum, msum


def _parity7(v):
    """Parity of a 7-bit field by xor folding (Triton on this jax cannot lower math.ctpop on tensors)."""
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    return (v ^ (v >> 1)) & 1


def _iq2xxs_s7(aux):
    """[BO, 8, 4] u32 7-bit sign fields of IQ2_XXS groups from aux [BO, 8] u32 (4 a sub-block)."""
    return (aux[:, :, None] >> (lax.broadcasted_iota(jnp.uint32, (1, 1, 4), 2) * 7)) & 127


def _iq2xxs_sign_bytes(aux):
    """[BO, 8, 4] u32 sign bytes of IQ2_XXS groups from aux [BO, 8] u32: per 8-element group a
    7-bit field, the 8th bit its parity (bit l: element l negative)."""
    s7 = _iq2xxs_s7(aux)
    return s7 | (_parity7(s7) << 7)


def _iq2xxs_negative(aux):
    """[BO, 8, 4, 8] sign bits of IQ2_XXS weights from aux [BO, 8] u32."""
    return (_iq2xxs_sign_bytes(aux)[..., None] >> lax.broadcasted_iota(jnp.uint32, (1, 1, 1, 8), 3)) & 1


def _isum_iq2xxs(x_ref, p, b, planes, sel, tab_ref):
    grid_ref, aux_ref = planes["grid"], planes["aux"]
    e, rows = sel
    x = x_ref[p, b].astype(I32)  # x viewed [P, nb, 8, 4, 8]: (sub-block, group, element)
    g = grid_ref[e, rows, b, :].astype(I32).reshape(-1, 8, 4, 1)  # grid index per group
    k = lax.broadcasted_iota(I32, (1, 1, 1, 8), 3)
    mag = tab_ref[g * 8 + k].astype(I32)  # [BO, 8, 4, 8] magnitudes (a 2 KB table: L1 hits)
    aux = aux_ref[e, rows, b, :]  # [BO, 8] u32
    val = jnp.where(_iq2xxs_negative(aux) != 0, -mag, mag)
    sub = jnp.sum(jnp.sum(val * x[None], axis=-1), axis=-1)  # [BO, 8]
    ls = (aux >> 28).astype(I32)
    return jnp.sum(sub * (2 * ls + 1), axis=-1), None


GRID32 = GRID.view(np.int32).reshape(-1)  # the table as 2 little-endian words per entry (v3)


# ---- kernel v3: packed int8 words and dp4a (four products and their sum per instruction) ----
# v1 spends ~8 integer ops per weight (decode, sign, multiply, add) and is ALU-bound at 11–32 %
# of the copy bandwidth (run 10). Here the activations come as int32 words of 4 int8 and the
# weights are decoded a word at a time: Q2_K/Q4_K by masking 2/4-bit fields of 4 bytes at
# once, IQ2_XXS by two table words per 8-element group with the signs applied as byte masks.
# The integer sums are the same exact values, so the bits are v1's.
_ONES = 0x01010101
_X3_VIEW = {Q4_K: (4, 2, 8), Q2_K: (2, 4, 8), IQ2_XXS: (32, 2), IQ2_NIB: (32, 2)}  # x words per super-block


def _isums_v3(qtype, x, b, planes, sel, tab_ref, interpret):
    """x: the packed activation words of super-block b (view _X3_VIEW)."""
    e, rows = sel
    mac = functools.partial(dp4a, interpret=interpret)
    zero = jnp.int32(0)
    if qtype == IQ2_XXS:  # group g = 4s + q of 8 elements: words 2g, 2g+1 of x and of GRID[grid[g]]
        g = planes["grid"][e, rows, b, :].astype(I32)  # [BO, 32]
        # two gathers from the 2 KB table per group (a 512-byte table of 2-bit codes decoded
        # arithmetically measured slower: 24.2 vs 23.4 µs, run 12)
        # (one gather of both words, [BO, 32, 2], measured 1-24 % slower: run 15)
        w0, w1 = tab_ref[g * 2], tab_ref[g * 2 + 1]
        aux = planes["aux"][e, rows, b, :]  # [BO, 8] u32: 4 × 7 sign bits, 4-bit scale
        # sign masks by popc/mul/prmt in PTX: 2-10 % faster than the same in jnp ops (run 17)
        m0, m1 = iq2_sign_masks(_iq2xxs_s7(aux).reshape(-1, 32).astype(I32), interpret)
        x0, x1 = pick(x, 1, 0)[None, :], pick(x, 1, 1)[None, :]
        # signed(m ^ 0xFF) = -m - 1, so Σ ±m·x = dp4a(m ^ M, x) - dp4a(M, x) (M = -1 bytes where negative)
        pos = mac(w1 ^ m1, x1, mac(w0 ^ m0, x0, zero))
        neg = mac(m1, x1, mac(m0, x0, zero))
        sub = jnp.sum((pos - neg).reshape(-1, 8, 4), axis=-1)  # [BO, 8] sub-block dots
        ls = (aux >> 28).astype(I32)
        return jnp.sum(sub * (2 * ls + 1), axis=-1), None
    if qtype == IQ2_NIB:  # word g: the nibbles of group g's 8 elements; x words 2g, 2g + 1
        w = planes["nib"][e, rows, b, :].astype(I32)  # [BO, 32]
        v0 = nib_bytes(w, _NIB_TABLE, interpret)  # elements 0-3: the low 16 bits select
        v1 = nib_bytes(lax.shift_right_logical(w, 16), _NIB_TABLE, interpret)
        x0, x1 = pick(x, 1, 0)[None, :], pick(x, 1, 1)[None, :]
        sub = jnp.sum(mac(v1, x1, mac(v0, x0, zero)).reshape(-1, 8, 4), axis=-1)  # [BO, 8]
        return jnp.sum(sub * planes["sc"][e, rows, b, :].astype(I32), axis=-1), None
    bsum_w = mac(jnp.int32(_ONES), x, zero)  # per-word sums of the activations
    if qtype == Q2_K:  # word (h, l4) = bytes 32h + 4l4..+3; bits 2j: elements 128h + 32j + 4l4..+3
        w = byte_words(planes["qs"][e, rows, b, :])  # [BO, 16] = (h, l4)
        sc = planes["sc"][e, rows, b, :].reshape(-1, 2, 4, 2).astype(I32)  # (h, j, half)
        bsum = jnp.sum(bsum_w.reshape(2, 4, 2, 4), axis=-1)  # (h, j, half)
        isum, msum = 0, 0
        for j in range(4):
            xj = pick(x, 1, j).reshape(1, 16)  # x words 32h + 8j + l4
            dots = mac((w >> (2 * j)) & 0x03030303, xj, zero)
            sub = jnp.sum(dots.reshape(-1, 2, 2, 4), axis=-1)  # [BO, h, half]
            scj = pick(sc, 2, j)
            isum = isum + jnp.sum(jnp.sum(sub * (scj & 15), -1), -1)
            msum = msum + jnp.sum(jnp.sum(pick(bsum, 1, j)[None] * (scj >> 4), -1), -1)
        return isum, msum
    # Q4_K: word (h, l4) = bytes 32h + 4l4..+3; low nibbles sub-block 2h, high nibbles 2h + 1
    w = byte_words(planes["qs"][e, rows, b, :]).reshape(-1, 4, 8)  # [BO, h, l4]
    lo = jnp.sum(mac(w & 0x0F0F0F0F, pick(x, 1, 0)[None], zero), axis=-1)  # [BO, 4]
    hi = jnp.sum(mac((w >> 4) & 0x0F0F0F0F, pick(x, 1, 1)[None], zero), axis=-1)
    sc = planes["sc"][e, rows, b, :].reshape(-1, 4, 2).astype(I32)
    mn = planes["m"][e, rows, b, :].reshape(-1, 4, 2).astype(I32)
    bsum = jnp.sum(bsum_w, axis=-1)  # [4, 2] (h, parity)
    isum = jnp.sum(lo * pick(sc, 2, 0) + hi * pick(sc, 2, 1), axis=-1)
    return isum, jnp.sum(jnp.sum(bsum[None] * mn, -1), -1)


def _isums_whole(qtype, x, planes, sel, tab_ref, interpret):
    """(isum, msum) [BO, nb] of every super-block of the rows at once: ``_isums_v3``'s integer dots
    with the super-blocks as a tensor axis (x: the pair's activation words [nb, *_X3_VIEW]), so a
    program issues all its loads before any dot (the same integers, so the same bits)."""
    e, rows = sel
    mac = functools.partial(dp4a, interpret=interpret)
    zero = jnp.int32(0)
    nb = x.shape[0]
    if qtype in _IQ2:  # group g = 4s + q of 8 elements: x words 2g, 2g + 1
        x0, x1 = pick(x, 2, 0)[None], pick(x, 2, 1)[None]  # [1, nb, 32]
        if qtype == IQ2_NIB:
            w = planes["nib"][e, rows, :, :].astype(I32)  # [BO, nb, 32]
            v0 = nib_bytes(w, _NIB_TABLE, interpret)
            v1 = nib_bytes(lax.shift_right_logical(w, 16), _NIB_TABLE, interpret)
            dots = mac(v1, x1, mac(v0, x0, zero))
            scale = planes["sc"][e, rows, :, :].astype(I32)  # [BO, nb, 8]
        else:
            g = planes["grid"][e, rows, :, :].astype(I32)  # [BO, nb, 32]
            w0, w1 = tab_ref[g * 2], tab_ref[g * 2 + 1]
            aux = planes["aux"][e, rows, :, :]  # [BO, nb, 8] u32
            s7 = (aux[..., None] >> (lax.broadcasted_iota(jnp.uint32, (1, 1, 1, 4), 3) * 7)) & 127
            m0, m1 = iq2_sign_masks(s7.reshape(g.shape).astype(I32), interpret)
            dots = mac(w1 ^ m1, x1, mac(w0 ^ m0, x0, zero)) - mac(m1, x1, mac(m0, x0, zero))
            scale = 2 * (aux >> 28).astype(I32) + 1
        bo = dots.shape[0]
        return jnp.sum(jnp.sum(dots.reshape(bo, nb, 8, 4), axis=-1) * scale, axis=-1), None
    if qtype == Q4_K:  # word (h, l4); low nibbles sub-block 2h, high 2h + 1
        w = byte_words(planes["qs"][e, rows, :, :])  # [BO, nb, 32]
        bo = w.shape[0]
        w = w.reshape(bo, nb, 4, 8)
        lo = jnp.sum(mac(w & 0x0F0F0F0F, pick(x, 2, 0)[None], zero), axis=-1)  # [BO, nb, 4]
        hi = jnp.sum(mac((w >> 4) & 0x0F0F0F0F, pick(x, 2, 1)[None], zero), axis=-1)
        sc = planes["sc"][e, rows, :, :].reshape(bo, nb, 4, 2).astype(I32)
        mn = planes["m"][e, rows, :, :].reshape(bo, nb, 4, 2).astype(I32)
        bsum = jnp.sum(mac(jnp.int32(_ONES), x, zero), axis=-1)  # [nb, 4, 2] (h, parity)
        isum = jnp.sum(lo * pick(sc, 3, 0) + hi * pick(sc, 3, 1), axis=-1)
        return isum, jnp.sum(jnp.sum(bsum[None] * mn, -1), -1)
    w = byte_words(planes["qs"][e, rows, :, :])  # Q2_K: [BO, nb, 16] = (h, l4)
    bo = w.shape[0]
    sc = planes["sc"][e, rows, :, :].reshape(bo, nb, 2, 4, 2).astype(I32)  # (h, j, half)
    bsum = jnp.sum(mac(jnp.int32(_ONES), x, zero).reshape(nb, 2, 4, 2, 4), axis=-1)  # [nb, h, j, half]
    isum, msum = 0, 0
    for j in range(4):
        xj = pick(x, 2, j).reshape(1, nb, 16)  # x words 32h + 8j + l4 of each super-block
        dots = mac((w >> (2 * j)) & 0x03030303, xj, zero)  # [BO, nb, 16]
        sub = jnp.sum(dots.reshape(bo, nb, 2, 2, 4), axis=-1)  # [BO, nb, h, half]
        scj = pick(sc, 3, j)
        isum = isum + jnp.sum(jnp.sum(sub * (scj & 15), -1), -1)
        msum = msum + jnp.sum(jnp.sum(pick(bsum, 2, j)[None] * (scj >> 4), -1), -1)
    return isum, msum


def _isums_v1(qtype, x_ref, p, b, planes, sel, tab_ref):
    if qtype == IQ2_XXS:
        return _isum_iq2xxs(x_ref, p, b, planes, sel, tab_ref)
    return (_isum_q2k if qtype == Q2_K else _isum_q4k)(x_ref, p, b, planes, sel)


def _kernel(z_ref, ids_ref, x_ref, *refs, qtype, names, nb, n_mat, tiles, cfg, version, interpret, quantize, rep):
    dx_ref, refs = (None, refs) if quantize else (refs[0], refs[1:])
    n_out = cfg.n_out
    plane_refs, out_refs = refs[:-n_out], refs[-n_out:]
    tab_ref = plane_refs[-1] if qtype == IQ2_XXS else None
    mats = [dict(zip(names, plane_refs[m * len(names) : (m + 1) * len(names)])) for m in range(n_mat)]
    BO = cfg.block_rows
    p, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    zero = z_ref[0]
    e = ids_ref[p]
    r = p // rep if rep > 1 else p  # the pair's activation row (a token's rows shared by its k pairs)
    steps = nb // cfg.k_splits  # this program's super-blocks: split j of the K axis

    def isums(b, planes, sel):
        """(isum, msum, dx) of super-block b: the integer dots and the activation block scale."""
        if version == 1:
            return *_isums_v1(qtype, x_ref, r, b, planes, sel, tab_ref), dx_ref[r, b]
        if quantize:  # f32 activations: this super-block quantized here, by the model's own function
            q, dq = quantize_q8_k(x_ref[r, b].reshape(1, QK_K), lambda v: opaque(v, zero), in_kernel=True)
            x = byte_words(q.reshape(QK_K).astype(I32) & 255).reshape(_X3_VIEW[qtype])
            dxb = jnp.sum(dq)  # the one block's scale (a register tile cannot be indexed)
        else:
            x, dxb = x_ref[r, b], dx_ref[r, b]
        return *_isums_v3(qtype, x, b, planes, sel, tab_ref, interpret), dxb

    def run(planes, tile):
        sel = (e, pl.ds(tile * BO, BO))

        def body(b, carry):
            s, err = carry
            isum, msum, dxb = isums(b, planes, sel)
            d = planes["d"][e, sel[1], b].astype(F32)
            if qtype in _IQ2:  # w = d (2 ls + 1) / 8 · grid · sign
                blk = opaque((d * dxb) * F32(0.125) * isum.astype(F32), zero)
            else:  # w = d sc q - dmin m: the min term from the activation sub-block sums
                dmin = planes["dmin"][e, sel[1], b].astype(F32)
                hi = opaque((d * dxb) * isum.astype(F32), zero)
                lo = opaque((dmin * dxb) * msum.astype(F32), zero)
                blk = hi - lo
            return two_sum_add(s, err, blk)

        zeros = jnp.zeros((BO,), F32)
        return lax.fori_loop(j * steps, (j + 1) * steps, body, (zeros, zeros))

    def run_whole(planes, tile):
        """Every super-block of the rows as a tensor axis, then the splits' TwoSum chains and their
        in-order sum as the split launch and ``finish`` make them: the same bits, one array out."""
        sel = (e, pl.ds(tile * BO, BO))
        isum, msum = _isums_whole(qtype, x_ref[r], planes, sel, tab_ref, interpret)  # [BO, nb]
        d = planes["d"][e, sel[1], :].astype(F32)
        dxs = dx_ref[r, :][None, :]  # [1, nb]
        if qtype in _IQ2:
            blk = opaque((d * dxs) * F32(0.125) * isum.astype(F32), zero)
        else:
            dmin = planes["dmin"][e, sel[1], :].astype(F32)
            blk = opaque((d * dxs) * isum.astype(F32), zero) - opaque((dmin * dxs) * msum.astype(F32), zero)
        S = cfg.k_splits
        blk3 = blk.reshape(BO, S, steps)  # (split, its super-blocks in order)
        s = err = jnp.zeros((BO, S), F32)
        for t in range(steps):
            s, err = two_sum_add(s, err, pick(blk3, 2, t))
        acc = (pick(s, 1, 0), pick(err, 1, 0))
        for u in range(1, S):
            acc = dd_add(acc, (pick(s, 1, u), pick(err, 1, u)))
        return acc

    go = run_whole if cfg.whole_k else run

    def run_from(m):
        """Several matrices in one launch (gate and up): row tiles [m·tiles, (m+1)·tiles) read matrix m."""
        if m == n_mat - 1:
            return go(mats[m], i - m * tiles)
        return lax.cond(i < (m + 1) * tiles, lambda: go(mats[m], i - m * tiles), lambda: run_from(m + 1))

    s, err = run_from(0)
    if n_out == 1:
        out_refs[0][...] = s + err
    else:  # partial double-float sums, combined in split order by ``finish``
        out_refs[0][...] = s
        out_refs[1][...] = err


_X_VIEW = {Q4_K: (4, 2, 32), Q2_K: (2, 4, 32), IQ2_XXS: (8, 4, 8)}


def supported(qtype: int, out: int) -> bool:
    return (qtype in TYPES or qtype in LAYOUTS) and out % 16 == 0


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """Launch shape of the expert kernel. ``k_splits`` (programs per row block along K, their
    partial sums combined in order after the kernel) decides the summation grouping, so it comes
    from the weight's shape alone, never from N; the rest only moves time."""

    block_rows: int = 32
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    # One program a row tile over the whole K (the super-blocks as a tensor axis, loaded at once),
    # its splits' chains added in order inside: the split launch's bits, no partials out.
    whole_k: bool = False

    @property
    def k_programs(self) -> int:
        """Programs a row tile along K: one whole-K program, else one a split."""
        return 1 if self.whole_k else self.k_splits

    @property
    def n_out(self) -> int:
        """Arrays out of the launch: the sums, or the K splits' (s, e) partials for ``finish``."""
        return 1 if self.k_programs == 1 else 2


# Super-blocks per program (the K split follows from it): run 15's sweep at N = 1 on an H200
# (rows 16/32/64 × splits 1/2/4/8): IQ2_XXS and Q4_K best at 4 (2048×4096: 24.7 → 20.1 and
# 21.4 → 14.7 µs; Q4_K 4096×2048 at 2 of 8 with 4 as good: 14.0 → 12.9), Q2_K at 1 (15.9 → 13.7).
# Programs of a few super-blocks fill the GPU (without a split, 6 pairs × 64 blocks of 32 rows
# = 384 programs: 18 % occupancy by Nsight Compute, run 14) while staying long enough to amortize.
# IQ2_NIB (session 13's sweep, H200, N = 1, one matrix): rows 64 × 4 super-blocks a program is
# the best of 16 rows × splits points (12.2 µs; 12.6-24.0 for the others), the same split as
# IQ2_XXS, so the two layouts also sum in the same order; stages 1-4 equal, 2 or 8 warps lose.
_BLOCKS_PER_PROGRAM = {IQ2_XXS: 4, Q4_K: 4, Q2_K: 1, IQ2_NIB: 4}


# Narrow programs (rows, warps) instead of 64 rows and 4 warps: the same bits (rows and warps only
# time). Dispatch reads the flags at trace time (ab_decode.py variants set them). H200, launches alone:
# - IQ2_XXS, session 20: 32 rows and 2 warps, gate+up 34.26 against 35.51 µs at N=1, equal at N=2
#   and 4; in the model (8 layers, session 21) 2,520.0 against 2,534.2 µs of kernels a step.
#   Session 24 (call 3): 16 rows and 1 warp, gate+up 33.76 / 61.76 / 116.41 µs at N = 1 / 2 / 4
#   against 35.13 / 63.06 / 118.24 at 32 rows and 2 warps (32 rows and 1 warp: 36.85 / 63.85 / 120.07).
# - Q2_K (down, 2048->4096, 8 splits), session 23: 16 rows and 1 warp, 12.46 against 13.64 µs at
#   N=1, 21.01 against 24.57 at N=2 (32 rows and 1 warp: 12.28 / 22.95; 2 warps: 14.01 / 25.19).
# - Q4_K, session 24 (call 3), 16 rows and 1 warp against 64 and 4: gate+up 26.82 / 49.32 / 101.01
#   µs at N = 1 / 2 / 4 against 27.54 / 50.72 / 106.83; down 13.25 / 23.26 / 43.90 against
#   12.93 / 24.20 / 44.02 (at 2 splits, its own).
IQ2_NARROW = True
Q2K_NARROW = True
Q4K_NARROW = True
NARROW_LAUNCH = {IQ2_XXS: (16, 1), Q2_K: (16, 1), Q4_K: (16, 1)}  # (rows, warps) a program


# Whole-K programs (``ExpertConfig.whole_k``): rows a program (0: off) and warps, per type. Dispatch
# reads them at trace time (ab_decode.py variants set them). H200, session 34 (launches alone, µs at
# N = 1 / 2): the nibbles' gate+up 23.84 / 39.97 at 64 rows and 4 warps in 4 splits, 18.84 / 32.85 as
# whole-K programs of 32 rows and 4 warps (69 % of copy at N = 1); Q2_K down 12.45 / 20.93 at 16 rows
# and 1 warp in 8 splits, 10.84 / 17.31 whole-K at 16 rows and 4 warps. 43 layers: 8.172 against
# 8.384 ms a token in one process, the same state and tokens.
Q2K_WHOLE, Q2K_WHOLE_WARPS = 16, 4
NIB_WHOLE, NIB_WHOLE_WARPS = 32, 4
# IQ2_XXS as stored (gate+up) 34.22 / 61.50 at 16 rows and 1 warp, 27.71 / 50.60 whole-K at 16 and 4;
# Q4_K (q4 files) gate+up 26.29 / 48.27 -> 20.94 / 36.56, down 12.99 / 23.77 -> 11.21 / 18.44 at 16 and 4.
IQ2_WHOLE, IQ2_WHOLE_WARPS = 16, 4
Q4K_WHOLE, Q4K_WHOLE_WARPS = 16, 4


def _whole(qtype: int) -> tuple[int, int]:
    return {
        Q2_K: (Q2K_WHOLE, Q2K_WHOLE_WARPS),
        IQ2_NIB: (NIB_WHOLE, NIB_WHOLE_WARPS),
        IQ2_XXS: (IQ2_WHOLE, IQ2_WHOLE_WARPS),
        Q4_K: (Q4K_WHOLE, Q4K_WHOLE_WARPS),
    }[qtype]


def _narrow(qtype: int) -> bool:
    return {IQ2_XXS: IQ2_NARROW, Q2_K: Q2K_NARROW, Q4_K: Q4K_NARROW}.get(qtype, False)


def choose_config(qtype: int, out: int, nb: int, whole: bool = True) -> ExpertConfig:
    """From the weight's shape alone (the split sets the summation grouping, so never from N).
    ``whole``: whole-K programs allowed (v3 on int8 input)."""
    rows = 64 if out % 64 == 0 else 32 if out % 32 == 0 else 16
    splits = max(1, nb // _BLOCKS_PER_PROGRAM[qtype])
    while nb % splits:
        splits -= 1
    whole_rows, whole_warps = _whole(qtype)
    if whole and whole_rows and out % whole_rows == 0 and is_pow2(nb):
        return ExpertConfig(block_rows=whole_rows, k_splits=splits, num_warps=whole_warps, whole_k=True)
    if _narrow(qtype) and out % NARROW_LAUNCH[qtype][0] == 0:
        narrow_rows, warps = NARROW_LAUNCH[qtype]
        return ExpertConfig(block_rows=narrow_rows, k_splits=splits, num_warps=warps)
    return ExpertConfig(block_rows=rows, k_splits=splits)


@functools.partial(jax.jit, static_argnames=("qtype", "cfg", "interpret", "version", "raw"))
def matmul(xq, dx, ids, qtype: int, planes, cfg: ExpertConfig | None = None, interpret=False, version=3, raw=False):
    """y[p, o] = Σ_i W[ids[p], o, i] x[p, i] for P pairs: xq [P, n] int8, dx [P, n/256] f32,
    ids [P] int32; planes of all experts [E, out, nb, ...] (only the selected are read).

    ``planes`` may be a tuple of plane dicts of one shape (gate and up): one launch computes
    all of them for the same x, and the result is the tuple of their outputs. ``dx=None``
    (v3): ``xq`` is the f32 activation [P, n] and the kernel quantizes it per super-block
    (``numerics.quantize_q8_k``, the same bits), saving the separate quantization kernels.
    ``version`` 3 (default): packed int8 words and dp4a; 1: integer dots element by element on
    CUDA cores (v2, int8 tiles on the tensor cores, measured 2-5x slower than v1 and was
    removed: speed-bench/KERNELS.md). Both give the reference's bits (exact integer sub-block
    dots, TwoSum over the super-blocks in order, K-split partials combined in order).

    ``raw``: each matrix's [P, out] as ``SplitSums``, the launch's partials left for the kernel
    that reads them (``quantize.swiglu_quantize``, ``hc_post.hc_post``) to add.

    ``xq`` (and ``dx``) may hold P/r rows for r consecutive pairs each (a token's k experts share
    its FFN input): pair p reads row p // r, so the rows are not repeated in memory first."""
    quantize = dx is None
    many = isinstance(planes, (tuple, list))
    mats = tuple(planes) if many else (planes,)
    Px, n = xq.shape
    P = ids.shape[0]
    if P % Px:
        raise ValueError(f"expert kernel: {P} pairs do not share {Px} activation rows evenly")
    nb = n // QK_K
    out = mats[0]["d"].shape[1]
    cfg = cfg or choose_config(qtype, out, nb, whole=version == 3 and not quantize)
    BO, S = cfg.block_rows, cfg.k_splits
    names = tuple(sorted(mats[0]))
    same = all(tuple(sorted(m)) == names and all(m[k].shape == mats[0][k].shape for k in names) for m in mats)
    if not supported(qtype, out) or out % BO or nb % S or not same:
        raise ValueError(f"expert kernel: unsupported type {qtype} / {out} rows / {nb} super-blocks / {cfg}")
    if cfg.whole_k and (version != 3 or quantize or not is_pow2(nb)):
        raise ValueError(f"expert kernel: whole-K programs take int8 input and 2^n super-blocks ({cfg})")
    if version not in (1, 3) or (version != 3 and (quantize or qtype in LAYOUTS)):
        raise ValueError(f"expert kernel: no version {version} (1 or 3; v2 is gone; f32 input and IQ2_NIB: v3 only)")
    if quantize:  # f32 activations, quantized per super-block in the kernel
        xv = xq.reshape(Px, nb, QK_K)
    elif version == 1:
        xv = xq.reshape(Px, nb, *_X_VIEW[qtype])
    else:  # int32 words of 4 int8: a bitcast of the small activation array
        xv = lax.bitcast_convert_type(xq.reshape(Px, n // 4, 4), I32).reshape(Px, nb, *_X3_VIEW[qtype])
    whole = lambda a: pl.BlockSpec(a.shape, lambda p, i, j: (0,) * a.ndim)
    dxs = [] if quantize else [dx]
    args = [
        kernel_zero(xq if quantize else dx, interpret),
        ids.astype(I32),
        xv,
        *dxs,
        *(m[k] for m in mats for k in names),
    ]
    if qtype == IQ2_XXS:
        args.append(jnp.asarray(GRID.reshape(-1) if version == 1 else GRID32))
    G, n_out, M, tiles = cfg.k_programs, cfg.n_out, len(mats), out // BO
    kernel = functools.partial(
        _kernel,
        qtype=qtype,
        names=names,
        nb=nb,
        n_mat=M,
        tiles=tiles,
        cfg=cfg,
        version=version,
        interpret=interpret,
        quantize=quantize,
        rep=P // Px,
    )
    res = pl.pallas_call(
        kernel,
        grid=(P, M * tiles, G),
        in_specs=[whole(a) for a in args],
        out_specs=[pl.BlockSpec((None, None, BO), lambda p, i, j: (j, p, i))] * n_out,
        out_shape=[jax.ShapeDtypeStruct((G, P, M * out), F32)] * n_out,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"experts_{qtype}",
    )(*args)
    if raw:
        sums = tuple(SplitSums(tuple(res), m * out, out, P) for m in range(M))
        return sums if many else sums[0]
    y = res[0][0] if n_out == 1 else finish(*res)
    return tuple(y[:, m * out : (m + 1) * out] for m in range(M)) if many else y
