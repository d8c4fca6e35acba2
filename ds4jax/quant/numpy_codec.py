"""NumPy decoders for the GGUF block formats (MODEL.md §3.1-3.5).

``decode(raw, qtype, n_per_row)`` turns raw GGUF bytes ``uint8 [..., row_bytes]`` into
``float32 [..., n_per_row]`` (I32 tensors decode to ``int32``). Every type is decoded
for all blocks at once with broadcasting; there is no Python loop over blocks.

Numerics: each weight is ``(scale * q) - offset`` with a single rounding (the final
subtraction): the scale products (f16 d times a <= 6-bit integer, times a <= 6-bit
quant) are exact in float32, so this decoder, gguf-py and the fused (FMA) jnp decoder
in ``jnp_decode`` all agree bit-for-bit.
"""

from __future__ import annotations

import numpy as np

from ds4jax.errors import DS4Error
from ds4jax.quant.formats import QType, as_qtype, row_nbytes
from ds4jax.quant.tables import IQ2XXS_GRID_F32, KSIGNS


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] (little-endian f16 bytes) -> float32 [...]."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _blocks(raw: np.ndarray, q: QType) -> np.ndarray:
    """uint8 [..., row_bytes] -> uint8 [..., nb, block_bytes] (a view when possible)."""
    return raw.reshape(raw.shape[:-1] + (raw.shape[-1] // q.block_bytes, q.block_bytes))


def _decode_q8_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[..., 0:2])
    qs = b[..., 2:34].view(np.int8).astype(np.float32)
    return qs * d[..., None]


# Q2_K element (half n, shift j, lane l) sits in crumb j of qs byte 32n+l (MODEL.md §3.3).
_Q2_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)


def _decode_q2_k(b: np.ndarray) -> np.ndarray:
    lead = b.shape[:-1]
    sc = b[..., 0:16]
    qs = b[..., 16:80].reshape(lead + (2, 1, 32))
    d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
    q = ((qs >> _Q2_SHIFT) & 3).reshape(lead + (16, 16))  # [.., (n,j,l//16), l%16]: 16 sub-blocks
    dl = d[..., None] * (sc & 15).astype(np.float32)
    ml = dmin[..., None] * (sc >> 4).astype(np.float32)
    return dl[..., None] * q.astype(np.float32) - ml[..., None]


def q4k_unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed scale bytes ``[..., 12]`` -> 6-bit (scale, min) ``[..., 8]`` each.

    Sub-blocks 0-3 keep their 6 bits in the low bits of bytes 0-3 (scale) and 4-7 (min);
    sub-blocks 4-7 have their low nibbles in bytes 8-11 and their top 2 bits in the top
    2 bits of bytes 0-3 (scale) and 4-7 (min).
    """
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 15) | ((lo_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, m


def q4k_pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of ``q4k_unpack_scales``: 6-bit ``[..., 8]`` x2 -> ``uint8 [..., 12]``."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    b0 = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    b1 = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    b2 = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    return np.concatenate([b0, b1, b2], axis=-1)


# Q4_K sub-block j is nibble j%2 of qs bytes 32*(j//2) .. +31 (MODEL.md §3.4).
_Q4_SHIFT = np.array([0, 4], dtype=np.uint8).reshape(2, 1)


def _decode_q4_k(b: np.ndarray) -> np.ndarray:
    lead = b.shape[:-1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, m = q4k_unpack_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(lead + (4, 1, 32))
    q = ((qs >> _Q4_SHIFT) & 15).reshape(lead + (8, 32)).astype(np.float32)
    dl = d[..., None] * sc.astype(np.float32)
    ml = dmin[..., None] * m.astype(np.float32)
    return dl[..., None] * q - ml[..., None]


_SIGN_SHIFT = np.array([0, 7, 14, 21], dtype=np.uint32)
_BIT = np.arange(8, dtype=np.uint8)


def _decode_iq2_xxs(b: np.ndarray) -> np.ndarray:
    lead = b.shape[:-1]
    d = _f16(b[..., 0:2])
    sub = b[..., 2:66].reshape(lead + (8, 8))  # 8 sub-blocks x (4 grid bytes, u32 aux)
    gidx = sub[..., 0:4]  # [.., 8, 4]
    aux = np.ascontiguousarray(sub[..., 4:8]).view("<u4")[..., 0].astype(np.uint32)  # [.., 8]
    db = d[..., None] * (np.float32(0.5) + (aux >> 28).astype(np.float32)) * np.float32(0.25)
    sbyte = KSIGNS[(aux[..., None] >> _SIGN_SHIFT) & 127]  # [.., 8, 4]
    neg = ((sbyte[..., None] >> _BIT) & 1).astype(bool)  # [.., 8, 4, 8]
    mag = db[..., None, None] * IQ2XXS_GRID_F32[gidx]  # [.., 8, 4, 8]
    return np.where(neg, -mag, mag)


_DECODERS = {
    QType.Q8_0: _decode_q8_0,
    QType.Q2_K: _decode_q2_k,
    QType.Q4_K: _decode_q4_k,
    QType.IQ2_XXS: _decode_iq2_xxs,
}

_PLAIN_DTYPES = {QType.F32: "<f4", QType.F16: "<f2", QType.I32: "<i4"}


def decode(raw: np.ndarray, qtype: QType | int | str, n_per_row: int) -> np.ndarray:
    """Decode raw GGUF bytes ``uint8 [..., row_bytes]`` to ``float32 [..., n_per_row]``.

    I32 decodes to ``int32`` (integer tables stay integers). DS4Error if the last dim
    is not ``row_nbytes(qtype, n_per_row)``.
    """
    q = as_qtype(qtype)
    raw = np.asarray(raw)
    want = row_nbytes(q, n_per_row)
    if raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] != want:
        raise DS4Error(
            f"{q.name} decode wants uint8 rows of {want} bytes for {n_per_row} elements,"
            f" got {raw.dtype} {raw.shape}"
        )
    lead = raw.shape[:-1]
    if q in _PLAIN_DTYPES:
        out = np.ascontiguousarray(raw).view(_PLAIN_DTYPES[q])
        return out.astype(np.int32 if q == QType.I32 else np.float32)
    if q == QType.BF16:
        # bf16 is the top half of an f32.
        u16 = np.ascontiguousarray(raw).view("<u2").astype(np.uint32)
        return (u16 << 16).view(np.float32)
    return _DECODERS[q](_blocks(raw, q)).reshape(lead + (n_per_row,)).astype(np.float32, copy=False)
