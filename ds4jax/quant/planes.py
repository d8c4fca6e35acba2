"""Load-time repacking of GGUF blocks into "planes" (``QTensor``).

GGUF blocks interleave f16 scales with packed quants at odd byte strides (34, 84, 144,
66), which jnp gathers and GPU kernels cannot load efficiently. At model load each
tensor is split into separate arrays ("planes") whose trailing dims are powers of two,
so kernels can tile them directly. Quant bits stay packed exactly as in the block
(bandwidth is what matters on GPU): only the metadata is rearranged, and every plane
layout is a lossless permutation of the block bytes (``unpack`` restores them).

Notation: ``shape = (*lead, n)`` is the logical shape (``n`` = GGUF ne0, the contiguous
"in" dim; ``lead`` e.g. ``(out,)`` or ``(n_expert, out)``); ``nb = n // 256`` super-blocks
per row for K/IQ types. Every plane has the leading dims ``lead``.

Plane layouts (see MODEL.md §3.2-3.5 for the formulas):

F32 / F16 / BF16 / I32
    ``w``     [*lead, n]        float32 / float16 / bfloat16 (ml_dtypes) / int32

Q8_0 (blocks of 32)
    ``qs``    [*lead, n]        int8      quant of element i
    ``d``     [*lead, n//32]    float16   scale of block i//32;  w = d * qs

Q2_K (super-blocks of 256 = 16 sub-blocks of 16)
    ``qs``    [*lead, nb, 64]   uint8     as in the block: element 128*h + 32*j + l is
                                          bits 2j..2j+1 of byte 32*h + l (h<2, j<4, l<32)
    ``sc``    [*lead, nb, 16]   uint8     as in the block: sub-block s = element // 16;
                                          low nibble scale, high nibble min
    ``d``     [*lead, nb]       float16
    ``dmin``  [*lead, nb]       float16   w = d*(sc&15)*q - dmin*(sc>>4)

Q4_K (super-blocks of 256 = 8 sub-blocks of 32)
    ``qs``    [*lead, nb, 128]  uint8     as in the block: element 32*j + l is nibble j%2
                                          (low nibble for even j) of byte 32*(j//2) + l
    ``sc``    [*lead, nb, 8]    uint8     6-bit scale of sub-block j (unpacked from the
    ``m``     [*lead, nb, 8]    uint8     6-bit min    12-byte packed form at load)
    ``d``     [*lead, nb]       float16
    ``dmin``  [*lead, nb]       float16   w = d*sc*q - dmin*m

IQ2_XXS (super-blocks of 256 = 8 sub-blocks of 32 = 4 groups of 8)
    ``grid``  [*lead, nb, 32]   uint8     grid index of group g = element // 8 (4*ib + l)
    ``aux``   [*lead, nb, 8]    uint32    raw per-sub-block word: bits 7l..7l+6 = sign
                                          index of group l, bits 28..31 = scale ls
    ``d``     [*lead, nb]       float16   w = d*(0.5+ls)/4 * GRID[grid][k] * sign_k

(``aux`` is kept as the raw u32 rather than split into sign bytes + scale bytes to keep
IQ2_XXS at 66 bytes per 256 weights; decoding it is a few shifts and a popcount.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from math import prod
from typing import Any

import jax
import ml_dtypes
import numpy as np

from ds4jax.errors import DS4Error
from ds4jax.quant.formats import QType, as_qtype, row_nbytes
from ds4jax.quant.numpy_codec import q4k_pack_scales, q4k_unpack_scales


def tree_nbytes(tree) -> int:
    """Bytes of a pytree's arrays (or of their ``jax.eval_shape`` shapes)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True, eq=False)
class QTensor:
    """A (possibly quantized) weight tensor stored as planes; a JAX pytree.

    ``qtype`` (GGML type id, int) and ``shape`` (logical shape, last dim = ne0) are
    static metadata; ``planes`` (dict name -> numpy or jax array) are the children.
    """

    qtype: int
    shape: tuple[int, ...]
    planes: dict[str, Any]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self.planes)

    def __repr__(self) -> str:
        planes = ", ".join(f"{k}={p.dtype}{list(p.shape)}" for k, p in self.planes.items())
        name = QType(self.qtype).name if self.qtype in QType._value2member_map_ else f"layout {self.qtype:#x}"
        return f"QTensor({name}, shape={self.shape}, {planes})"


jax.tree_util.register_dataclass(QTensor, data_fields=["planes"], meta_fields=["qtype", "shape"])


_PLAIN_DTYPES = {
    QType.F32: np.dtype("<f4"),
    QType.F16: np.dtype("<f2"),
    QType.BF16: np.dtype(ml_dtypes.bfloat16),
    QType.I32: np.dtype("<i4"),
}


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] -> float16 [...] (copies the strided bytes)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float16)


def _u8(a: np.ndarray) -> np.ndarray:
    """float16 / uint32 [...] -> its little-endian bytes uint8 [..., k]."""
    a = np.asarray(a)
    le = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(le)[..., None].view(np.uint8)


def pack(raw: np.ndarray, qtype: QType | int | str, shape: Sequence[int]) -> QTensor:
    """Repack raw GGUF bytes of a tensor of logical ``shape`` into a ``QTensor``.

    ``raw`` is uint8 of any shape with ``tensor_nbytes(qtype, shape)`` bytes in total
    (e.g. ``[..., row_bytes]`` or flat). Plain types are zero-copy views when ``raw`` is
    contiguous (e.g. a memmap); quantized types copy into new planes.
    """
    q = as_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise DS4Error(f"{q.name} tensor needs at least one dimension")
    lead, n = shape[:-1], shape[-1]
    rb = row_nbytes(q, n)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != prod(lead) * rb:
        raise DS4Error(f"{q.name} tensor of shape {shape} needs {prod(lead) * rb} bytes, got {raw.dtype} {raw.shape}")
    if q in _PLAIN_DTYPES:
        w = np.ascontiguousarray(raw).reshape(-1).view(_PLAIN_DTYPES[q]).reshape(shape)
        return QTensor(int(q), shape, {"w": w})
    nb = n // q.block_elems
    b = raw.reshape(lead + (nb, q.block_bytes))
    if q == QType.Q8_0:
        planes = {
            "qs": np.ascontiguousarray(b[..., 2:34]).view(np.int8).reshape(shape),
            "d": _f16(b[..., 0:2]),
        }
    elif q == QType.Q2_K:
        planes = {
            "qs": np.ascontiguousarray(b[..., 16:80]),
            "sc": np.ascontiguousarray(b[..., 0:16]),
            "d": _f16(b[..., 80:82]),
            "dmin": _f16(b[..., 82:84]),
        }
    elif q == QType.Q4_K:
        sc, m = q4k_unpack_scales(b[..., 4:16])
        planes = {
            "qs": np.ascontiguousarray(b[..., 16:144]),
            "sc": np.ascontiguousarray(sc),
            "m": np.ascontiguousarray(m),
            "d": _f16(b[..., 0:2]),
            "dmin": _f16(b[..., 2:4]),
        }
    elif q == QType.IQ2_XXS:
        sub = b[..., 2:66].reshape(lead + (nb, 8, 8))
        planes = {
            "grid": np.ascontiguousarray(sub[..., 0:4]).reshape(lead + (nb, 32)),
            "aux": np.ascontiguousarray(sub[..., 4:8]).view("<u4")[..., 0].astype(np.uint32),
            "d": _f16(b[..., 0:2]),
        }
    else:  # pragma: no cover - every QType is handled above
        raise DS4Error(f"no plane layout for {q.name}")
    return QTensor(int(q), shape, planes)


def unpack(qt: QTensor) -> np.ndarray:
    """Inverse of ``pack``: the raw GGUF bytes ``uint8 [*lead, row_bytes]``."""
    q = QType(qt.qtype)
    lead, n = qt.shape[:-1], qt.shape[-1]
    p = {k: np.asarray(v) for k, v in qt.planes.items()}
    if q in _PLAIN_DTYPES:
        w = p["w"].astype(_PLAIN_DTYPES[q])
        return np.ascontiguousarray(w).view(np.uint8).reshape(lead + (row_nbytes(q, n),))
    nb = n // q.block_elems
    if q == QType.Q8_0:
        parts = [_u8(p["d"]), p["qs"].reshape(lead + (nb, 32)).view(np.uint8)]
    elif q == QType.Q2_K:
        parts = [p["sc"], p["qs"], _u8(p["d"]), _u8(p["dmin"])]
    elif q == QType.Q4_K:
        parts = [_u8(p["d"]), _u8(p["dmin"]), q4k_pack_scales(p["sc"], p["m"]), p["qs"]]
    elif q == QType.IQ2_XXS:
        grid = p["grid"].reshape(lead + (nb, 8, 4))
        sub = np.concatenate([grid, _u8(p["aux"].astype(np.uint32))], axis=-1)
        parts = [_u8(p["d"]), sub.reshape(lead + (nb, 64))]
    else:  # pragma: no cover
        raise DS4Error(f"no plane layout for {q.name}")
    return np.concatenate(parts, axis=-1).reshape(lead + (row_nbytes(q, n),))
