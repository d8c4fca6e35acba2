"""Write GGUF files in ds4's layout (used by the model generator and by tests).

Metadata values are written with the GGUF value types ds4 accepts (u32 shapes,
f32 scalars, u64 context lengths, i32/u32 arrays, bool); tensors are raw bytes
with their GGML type and GGUF dims ``ne`` (ne[0] fastest).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

# Keys ds4 reads as u64 (MODEL.md §2.2); other integers are written as u32.
_U64_KEYS = frozenset({"deepseek4.context_length", "deepseek4.rope.scaling.original_context_length"})


def _add_kv(w, key: str, val: Any) -> None:
    from gguf import GGUFValueType as T

    if isinstance(val, bool):
        w.add_key_value(key, val, T.BOOL)
    elif isinstance(val, int):
        w.add_key_value(key, val, T.UINT64 if key in _U64_KEYS else T.UINT32)
    elif isinstance(val, float):
        w.add_key_value(key, val, T.FLOAT32)
    elif isinstance(val, str):
        w.add_key_value(key, val, T.STRING)
    elif isinstance(val, (list, tuple)):
        if not val:
            raise ValueError(f"empty array for {key}")
        first = val[0]
        if isinstance(first, str):
            sub = T.STRING
        elif isinstance(first, float):
            sub = T.FLOAT32
        elif key.endswith("token_type"):
            sub = T.INT32
        else:
            sub = T.UINT32 if min(val) >= 0 else T.INT32
        w.add_key_value(key, list(val), T.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"unsupported metadata value for {key}: {type(val).__name__}")


def write_gguf(
    path: str | os.PathLike,
    metadata: dict[str, Any],
    tensors: Iterable[tuple[str, np.ndarray, int, tuple[int, ...]]],
    alignment: int | None = None,
) -> None:
    """Write a GGUF v3 file.

    ``tensors`` yields ``(name, data, type_id, ne)``: ``data`` is the tensor's
    bytes (uint8) for quantized types, or an array of the plain dtype.
    ``metadata`` must include ``general.architecture``.
    """
    import logging

    from gguf import GGMLQuantizationType, GGUFWriter

    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # no per-file INFO lines
    md = dict(metadata)
    arch = md.pop("general.architecture")
    w = GGUFWriter(os.fspath(path), arch=arch)
    if alignment is not None:
        w.data_alignment = alignment
        w.add_uint32("general.alignment", alignment)
    for k, v in md.items():
        _add_kv(w, k, v)
    for name, data, type_id, ne in tensors:
        data = np.ascontiguousarray(data)
        # gguf-py takes a numpy-order shape; for quantized types it is the byte shape.
        qt = GGMLQuantizationType(type_id)
        if data.dtype == np.uint8:
            w.add_tensor(name, data.reshape(tuple(reversed(ne[1:])) + (-1,)), raw_dtype=qt)
        else:
            w.add_tensor(name, data.reshape(tuple(reversed(ne))), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
