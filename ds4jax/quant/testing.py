"""Random *valid* GGUF tensor bytes for tests of decoders and plane layouts.

Quant bits are random bytes; the f16 ``d`` / ``dmin`` fields are finite, non-zero,
moderate (|v| in [1/64, 2], random sign); and within every block the sub-block scales
are all distinct, so a decoder that mixes up sub-block order cannot pass a bit-exact
comparison by luck.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ds4jax.quant.encode import encode
from ds4jax.quant.formats import QType, as_qtype
from ds4jax.quant.numpy_codec import q4k_pack_scales


def _f16_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    v = np.exp2(rng.uniform(-6, 1, shape)) * rng.choice([-1.0, 1.0], shape)
    return v.astype("<f2")[..., None].view(np.uint8)


def _distinct(rng: np.random.Generator, lead: tuple[int, ...], k: int, hi: int) -> np.ndarray:
    """uint8 [*lead, k]: k distinct values from range(hi) per row (random order)."""
    keys = rng.random(lead + (hi,))
    return np.argsort(keys, axis=-1)[..., :k].astype(np.uint8)


def random_raw(qtype: QType | int | str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random valid bytes ``uint8 [*shape[:-1], row_bytes]`` for a tensor of logical ``shape``."""
    q = as_qtype(qtype)
    shape = tuple(shape)
    lead, n = shape[:-1], shape[-1]
    if q == QType.I32:
        return encode(rng.integers(-(2**31), 2**31 - 1, shape, dtype=np.int64), q)
    if not q.is_quantized:
        x = rng.standard_normal(shape) * np.exp2(rng.uniform(-4, 4, shape))
        return encode(x.astype(np.float32), q)
    nb = n // q.block_elems
    b = rng.integers(0, 256, lead + (nb, q.block_bytes), dtype=np.uint8)
    bl = lead + (nb,)
    if q == QType.Q8_0:
        b[..., 0:2] = _f16_field(rng, bl)
    elif q == QType.Q2_K:
        # 16 distinct 4-bit scales per block (a permutation of 0..15), random mins.
        b[..., 0:16] = _distinct(rng, bl, 16, 16) | (b[..., 0:16] & 0xF0)
        b[..., 80:82] = _f16_field(rng, bl)
        b[..., 82:84] = _f16_field(rng, bl)
    elif q == QType.Q4_K:
        sc = _distinct(rng, bl, 8, 64)
        m = rng.integers(0, 64, bl + (8,), dtype=np.uint8)
        b[..., 4:16] = q4k_pack_scales(sc, m)
        b[..., 0:2] = _f16_field(rng, bl)
        b[..., 2:4] = _f16_field(rng, bl)
    elif q == QType.IQ2_XXS:
        b[..., 0:2] = _f16_field(rng, bl)
        sub = b[..., 2:66].reshape(bl + (8, 8))
        sub[..., 7] = (sub[..., 7] & 0x0F) | (_distinct(rng, bl, 8, 16) << 4)  # ls = top nibble of aux
        b[..., 2:66] = sub.reshape(bl + (64,))
    return b.reshape(lead + (nb * q.block_bytes,))
