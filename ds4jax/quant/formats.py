"""GGML tensor types that ds4jax reads: ids, block geometry and byte sizes.

A GGUF tensor row (the contiguous ``ne0`` / "in" dimension) is a sequence of blocks;
each block holds ``block_elems`` weights in ``block_bytes`` bytes (MODEL.md §3).
Plain types (F32, F16, BF16, I32) are "blocks" of one element.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from math import prod

from ds4jax.errors import DS4Error


class QType(enum.IntEnum):
    """GGML type ids (values are the ids stored in the GGUF tensor info)."""

    F32 = 0
    F16 = 1
    Q8_0 = 8
    Q2_K = 10
    Q4_K = 12
    IQ2_XXS = 16
    I32 = 26
    BF16 = 30

    @property
    def block_elems(self) -> int:
        return _GEOMETRY[self][0]

    @property
    def block_bytes(self) -> int:
        return _GEOMETRY[self][1]

    @property
    def is_quantized(self) -> bool:
        return self.block_elems > 1


# qtype -> (elements per block, bytes per block)
_GEOMETRY: dict[QType, tuple[int, int]] = {
    QType.F32: (1, 4),
    QType.F16: (1, 2),
    QType.BF16: (1, 2),
    QType.I32: (1, 4),
    QType.Q8_0: (32, 34),  # f16 d + 32 x int8
    QType.Q2_K: (256, 84),  # 16 scale bytes + 64 qs bytes + f16 d + f16 dmin
    QType.Q4_K: (256, 144),  # f16 d + f16 dmin + 12 scale bytes + 128 qs bytes
    QType.IQ2_XXS: (256, 66),  # f16 d + 8 x (4 grid bytes + u32 aux)
}


def qtype_from_id(qtype_id: int) -> QType:
    """The QType for a GGML type id; DS4Error if ds4jax does not support it."""
    try:
        return QType(int(qtype_id))
    except ValueError:
        supported = ", ".join(f"{q.name}={q.value}" for q in QType)
        raise DS4Error(f"unsupported GGML tensor type id {qtype_id} (supported: {supported})") from None


def as_qtype(qtype: QType | int | str) -> QType:
    """Accept a QType, a GGML id, or a type name such as ``"q4_k"``."""
    if isinstance(qtype, QType):
        return qtype
    if isinstance(qtype, str):
        try:
            return QType[qtype.upper()]
        except KeyError:
            raise DS4Error(f"unsupported tensor type name {qtype!r}") from None
    return qtype_from_id(qtype)


def row_nbytes(qtype: QType | int | str, n: int) -> int:
    """Bytes of one row of ``n`` elements; DS4Error if ``n`` is not a whole number of blocks."""
    q = as_qtype(qtype)
    if n < 0 or n % q.block_elems:
        raise DS4Error(f"{q.name} row length {n} is not a multiple of its block size {q.block_elems}")
    return n // q.block_elems * q.block_bytes


def tensor_nbytes(qtype: QType | int | str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of logical ``shape`` (last dim = contiguous ne0)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return row_nbytes(qtype, 1)
    return prod(shape[:-1]) * row_nbytes(qtype, shape[-1])
