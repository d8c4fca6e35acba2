"""Vectorized NumPy encoders: ``encode(x float32 [..., n], qtype) -> uint8 [..., row_bytes]``.

Used to build test/synthetic GGUF files; quality is "sensible nearest fit", not ggml's
importance-weighted search. Work is done on all blocks of a chunk of rows at once (the
only Python loop is over ~256K-element row chunks, which bounds temporary memory).

* Q8_0: identical to ggml/gguf-py (amax/127 scale, round half away from zero).
* Q4_K / Q2_K: per sub-block affine fit ``v ~ S*q - M`` (M >= 0), started from the
  min/max range and refined by a few Lloyd steps (nearest q, then least-squares S, M);
  S and M are then quantized to 6-bit (Q4_K) / 4-bit (Q2_K) multiples of the f16
  super-block ``d`` / ``dmin`` and q is re-rounded against the values that will
  actually be decoded.
* IQ2_XXS: per sub-block scale from the sub-block max, refined by least squares,
  quantized to ``d*(2*ls+1)/8``; each group of 8
  takes the nearest of the 256 grid magnitude vectors; signs come from the data and
  the even-parity rule is met by flipping the sign whose flip costs least.
"""

from __future__ import annotations

import numpy as np

from ds4jax.errors import DS4Error
from ds4jax.quant.formats import QType, as_qtype
from ds4jax.quant.numpy_codec import q4k_pack_scales
from ds4jax.quant.tables import IQ2XXS_GRID_F32

_CHUNK_ELEMS = 1 << 18


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C ``roundf``, what ggml's Q8_0 uses)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v)  # a - f is exact, so the tie test is exact


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float [...] -> uint8 [..., 2] little-endian f16."""
    return v.astype("<f2")[..., None].view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


# ---------------------------------------------------------------- Q8_0


def _encode_q8_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(x.shape[0], -1, 32)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    inv = _safe_div(np.float32(1), d)
    q = _round_half_away(b * inv).astype(np.int8)
    return np.concatenate([_f16_bytes(d[..., 0]), q.view(np.uint8)], axis=-1).reshape(x.shape[0], -1)


# ---------------------------------------------------------------- Q4_K / Q2_K


def _fit_affine(v: np.ndarray, nq: int, iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``v ~ S*q - M`` per last-axis sub-block, q in [0, nq], M >= 0. Returns S, M [...]."""
    lo = np.minimum(v.min(axis=-1), 0)
    S = (v.max(axis=-1) - lo) / np.float32(nq)
    M = -lo
    n = np.float32(v.shape[-1])
    sv = v.sum(axis=-1)
    for _ in range(iters):
        q = np.clip(np.rint(_safe_div(v + M[..., None], S[..., None])), 0, nq)
        sq, sqq, sqv = q.sum(-1), (q * q).sum(-1), (q * v).sum(-1)
        den = n * sqq - sq * sq
        S_ls = _safe_div(n * sqv - sq * sv, den)
        M_ls = (S_ls * sq - sv) / n
        # Constrained optimum when the free fit wants M < 0: M = 0, S = <q,v>/<q,q>.
        S_0 = _safe_div(sqv, sqq)
        ok = den > 0
        S = np.where(ok, np.where(M_ls >= 0, S_ls, S_0), S)
        M = np.where(ok, np.where(M_ls >= 0, M_ls, 0), M)
        S = np.maximum(S, 0)
    return S.astype(np.float32), M.astype(np.float32)


def _kquant(sub: np.ndarray, nq: int, smax: int) -> tuple[np.ndarray, ...]:
    """sub: float32 [R, nb, nsub, sub_len]. Returns d16, dmin16 [R, nb], sc, m [R, nb, nsub], q."""
    S, M = _fit_affine(sub, nq)
    d = (S.max(axis=-1) / np.float32(smax)).astype(np.float16)
    dmin = (M.max(axis=-1) / np.float32(smax)).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(_safe_div(S, d32[..., None])), 0, smax).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(M, dmin32[..., None])), 0, smax).astype(np.uint8)
    # Re-round q against the scales the decoder will actually see.
    Sq = d32[..., None] * sc.astype(np.float32)
    Mq = dmin32[..., None] * m.astype(np.float32)
    q = np.clip(np.rint(_safe_div(sub + Mq[..., None], Sq[..., None])), 0, nq).astype(np.uint8)
    return d, dmin, sc, m, q


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    R = x.shape[0]
    d, dmin, sc, m, q = _kquant(x.reshape(R, -1, 8, 32), 15, 63)
    nb = q.shape[1]
    q = q.reshape(R, nb, 4, 2, 32)  # sub-block 2i in low nibbles, 2i+1 in high nibbles
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(R, nb, 128)
    blk = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), q4k_pack_scales(sc, m), qs], axis=-1)
    return blk.reshape(R, -1)


_Q2_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)


def _encode_q2_k(x: np.ndarray) -> np.ndarray:
    R = x.shape[0]
    d, dmin, sc, m, q = _kquant(x.reshape(R, -1, 16, 16), 3, 15)
    nb = q.shape[1]
    # Element 128n + 32j + l lives in crumb j of byte 32n + l.
    q = q.reshape(R, nb, 2, 4, 32)
    qs = np.bitwise_or.reduce(q << _Q2_SHIFT, axis=-2).reshape(R, nb, 64)
    blk = np.concatenate([sc | (m << 4), qs, _f16_bytes(d), _f16_bytes(dmin)], axis=-1)
    return blk.reshape(R, -1)


# ---------------------------------------------------------------- IQ2_XXS

_G = IQ2XXS_GRID_F32  # [256, 8]
_GAUG = np.concatenate([-2 * _G.T, (_G * _G).sum(axis=1)[None]], axis=0)  # [9, 256]


def _encode_iq2_xxs(x: np.ndarray) -> np.ndarray:
    R = x.shape[0]
    v = x.reshape(R, -1, 8, 4, 8)  # [R, nb, sub-block, group, 8]
    nb = v.shape[1]
    a = np.abs(v)
    # cost(g; s) = s^2|g|^2 - 2s<a,g> (+|a|^2) = s * ([a, s] @ [-2g; |g|^2]): one small
    # matmul scores all 256 grid entries for every group at once.
    aug = np.empty((R, nb, 8, 4, 9), np.float32)
    aug[..., :8] = a

    def best(s: np.ndarray) -> np.ndarray:
        """Per group: index of the best grid entry for sub-block scale s [R, nb, 8]."""
        aug[..., 8] = s[..., None]
        c = aug.reshape(-1, 9) @ _GAUG
        idx = c.argmin(axis=-1)
        return idx.reshape(R, nb, 8, 4)

    # Start from s = 0.8 * amax / 43 (43 = largest grid magnitude; trying several
    # starts or extra assign/refit rounds gained < 0.5% error for 2x the time), take
    # the best entries for it, then refit s by least squares.
    idx = best(a.max(axis=(-1, -2)) * np.float32(0.8 / 43))
    g = _G[idx]  # [R, nb, 8, 4, 8]
    s = _safe_div((a * g).sum(axis=(-1, -2)), (g * g).sum(axis=(-1, -2)))
    # Quantize: s = d * (2*ls + 1) / 8, ls in 0..15, d an f16 per block.
    d = (s.max(axis=-1) * np.float32(8 / 31)).astype(np.float16)
    d32 = d.astype(np.float32)
    ls = np.clip(np.rint((_safe_div(s * 8, d32[..., None]) - 1) / 2), 0, 15).astype(np.uint32)
    s_q = d32[..., None] * (np.float32(0.5) + ls.astype(np.float32)) * np.float32(0.25)
    idx = best(s_q)
    g = _G[idx]
    # Signs from the data; odd groups flip the element with the smallest |x|*g.
    neg = v < 0
    odd = neg.sum(axis=-1) % 2 == 1
    flip = np.argmin(a * g, axis=-1)
    neg ^= odd[..., None] & (np.arange(8) == flip[..., None])
    sidx = (neg[..., :7].astype(np.uint32) << np.arange(7, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    aux = (sidx << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(axis=-1, dtype=np.uint32) | (ls << 28)
    sub = np.concatenate([idx.astype(np.uint8), aux.astype("<u4")[..., None].view(np.uint8)], axis=-1)
    blk = np.concatenate([_f16_bytes(d), sub.reshape(R, nb, 64)], axis=-1)
    return blk.reshape(R, -1)


# ---------------------------------------------------------------- plain types


def _encode_bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    # Round to nearest even on the dropped 16 bits; keep NaNs NaN (set a mantissa bit).
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(np.isnan(x), ((u >> 16) | 0x40).astype(np.uint16), r)
    return r.astype("<u2").view(np.uint8).reshape(x.shape[0], -1)


_ENCODERS = {
    QType.Q8_0: _encode_q8_0,
    QType.Q2_K: _encode_q2_k,
    QType.Q4_K: _encode_q4_k,
    QType.IQ2_XXS: _encode_iq2_xxs,
}


def encode(x: np.ndarray, qtype: QType | int | str) -> np.ndarray:
    """Encode ``x [..., n]`` as GGUF rows ``uint8 [..., row_bytes]`` of type ``qtype``.

    DS4Error if ``n`` is not a multiple of the block size or x is not finite.
    """
    q = as_qtype(qtype)
    x = np.asarray(x)
    if x.ndim == 0:
        raise DS4Error(f"{q.name} encode needs at least a 1-D array")
    n = x.shape[-1]
    if n % q.block_elems:
        raise DS4Error(f"{q.name} row length {n} is not a multiple of its block size {q.block_elems}")
    lead = x.shape[:-1]
    if q == QType.I32:
        return np.ascontiguousarray(x.astype("<i4")).view(np.uint8).reshape(lead + (4 * n,))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if q == QType.F32:
        return x.astype("<f4").view(np.uint8).reshape(lead + (4 * n,))
    if q == QType.F16:
        return x.astype("<f2").view(np.uint8).reshape(lead + (2 * n,))
    rows = x.reshape(-1, n)
    if q == QType.BF16:
        return _encode_bf16(rows).reshape(lead + (2 * n,))
    if not np.isfinite(rows).all():
        raise DS4Error(f"{q.name} encode input has non-finite values")
    fn = _ENCODERS[q]
    if rows.shape[0] == 0:
        return np.zeros(lead + (n // q.block_elems * q.block_bytes,), np.uint8)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    out = np.concatenate([fn(rows[i : i + step]) for i in range(0, rows.shape[0], step)], axis=0)
    return out.reshape(lead + (out.shape[-1],))
