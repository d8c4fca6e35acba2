"""Open a GGUF file memory-mapped and check that it is one.

This module knows the container only (header, metadata, tensor table, data
bounds); what the tensors must be is ``config.py``'s business. Tensor bytes are
never copied here: each ``TensorInfo.raw`` is a uint8 view into the mmap.

Every failure is a ``DS4Error`` whose one-line message starts with the path.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np

from ds4jax.errors import DS4Error

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # ds4 accepts version 3 only.
_HEADER_BYTES = 24  # magic u32, version u32, n_tensors u64, n_kv u64


def _tensor_nbytes(type_id: int, ne) -> int | None:
    """Bytes of a tensor of any GGML type gguf-py knows (None for an unknown id)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        blk, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in ne:
        n *= int(d)
    return n // blk * size


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne[0] is the contiguous (fastest) dimension
    type_id: int  # GGML type id as stored
    offset: int  # absolute byte offset in the file
    nbytes: int
    raw: np.ndarray = dataclasses.field(repr=False, compare=False)  # uint8 view, len nbytes

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The row-major (PyTorch/HF) shape: reversed ``ne``."""
        return tuple(reversed(self.ne))


# GGUF value types (gguf.GGUFValueType): id -> (struct code, size); 8 string, 9 array.
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header.

    Our own parser rather than gguf.GGUFReader: the reader builds numpy views
    per array item and needs ~6 s for the 129k-token vocabulary; this takes
    ~0.2 s. ``tests/test_gguf_file.py`` checks both agree.
    """

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, count = self.unpack("IQ")
            if sub == _STRING:
                return [self.string() for _ in range(count)]
            if sub not in _NP_DTYPE:
                raise ValueError(f"array of unknown value type {sub}")
            dt = np.dtype(_NP_DTYPE[sub])
            arr = np.frombuffer(self.take(count * dt.itemsize), dtype=dt)
            return [bool(x) for x in arr] if sub == 7 else arr.tolist()
        if vtype not in _SCALAR_FMT:
            raise ValueError(f"unknown value type {vtype}")
        (v,) = self.unpack(_SCALAR_FMT[vtype])
        return v


class GGUFFile:
    """A validated, memory-mapped GGUF container.

    Attributes: ``path``, ``version``, ``metadata`` (key -> Python value: str,
    int, float, bool or list), ``tensors`` (name -> TensorInfo, in file order),
    ``file_size``, ``data_offset``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        p = self.path
        if not os.path.exists(p):
            raise DS4Error(f"{p}: no such file")
        if os.path.isdir(p):
            raise DS4Error(f"{p}: is a directory, not a GGUF file")
        self.file_size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if len(head) < 4 or head[:4] != GGUF_MAGIC:
            raise DS4Error(f"{p}: not a GGUF file (bad magic {head[:4]!r})")
        if len(head) < _HEADER_BYTES:
            raise DS4Error(f"{p}: truncated GGUF ({self.file_size} bytes, header needs {_HEADER_BYTES})")
        (self.version,) = struct.unpack("<I", head[4:8])
        if self.version != GGUF_VERSION:
            raise DS4Error(f"{p}: unsupported GGUF version {self.version} (need {GGUF_VERSION})")

        mm = np.memmap(p, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(mm))
        meta: dict[str, Any] = {}
        infos = []
        try:
            cur.take(8)
            n_tensors, n_kv = cur.unpack("QQ")
            for _ in range(n_kv):
                key = cur.string()
                (vtype,) = cur.unpack("I")
                try:
                    meta[key] = cur.value(vtype)
                except ValueError as e:
                    raise DS4Error(f"{p}: corrupt metadata field {key!r} ({e})") from None
            for _ in range(n_tensors):
                name = cur.string()
                (n_dims,) = cur.unpack("I")
                if not 1 <= n_dims <= 8:
                    raise DS4Error(f"{p}: corrupt tensor info for {name!r} ({n_dims} dims)")
                ne = cur.unpack("Q" * n_dims)
                type_id, offset = cur.unpack("IQ")
                infos.append((name, ne, type_id, offset))
        except _Truncated:
            raise DS4Error(f"{p}: truncated GGUF header ({self.file_size} bytes)") from None
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise DS4Error(f"{p}: bad general.alignment {align!r}")
        data_start = -(-cur.pos // align) * align
        self.metadata = meta
        self.data_offset = data_start

        tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in infos:
            n = _tensor_nbytes(type_id, ne)
            if n is None:
                raise DS4Error(f"{p}: tensor {name!r} has unknown GGML type id {type_id}")
            start = data_start + offset
            if start + n > self.file_size:
                raise DS4Error(
                    f"{p}: truncated GGUF: tensor {name!r} needs bytes {start}..{start + n} "
                    f"but the file has {self.file_size}"
                )
            if name in tensors:
                raise DS4Error(f"{p}: duplicate tensor {name!r}")
            tensors[name] = TensorInfo(
                name=name, ne=tuple(int(x) for x in ne), type_id=int(type_id),
                offset=start, nbytes=n, raw=mm[start : start + n],
            )
        self.tensors = tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
