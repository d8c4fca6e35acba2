"""How much device memory JAX can still hand out: the check before loading a model and the
room a repack of the experts may take.

JAX's allocator statistics say it where they exist (XLA's BFC allocator: ``bytes_limit``, the
memory share, less ``bytes_in_use``). The engine's CUDA-graph option (``xla_options``:
``SKIP_TEMP``) makes XLA use its VMM allocator instead, which gives no statistics at all
(``memory_stats()`` is None: H200, session 33). Its limit is the memory share of the GPU's memory,
and the buffers it frees keep their physical memory until an allocation of the same size takes
them; so there the room is the GPU's free physical memory (the driver's ``cuMemGetInfo``) less
the part of the GPU outside JAX's share (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 unless set).
"""

from __future__ import annotations

import ctypes
import os

import jax

JAX_DEFAULT_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION when it is not set


def cuda_mem_info(ordinal: int = 0) -> tuple[int, int] | None:
    """(free, total) bytes of CUDA device ``ordinal`` from the driver, in its primary context (the
    one XLA uses); None where there is no CUDA driver or the call fails."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    if cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), ordinal):
        return None
    if cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev):
        return None
    try:
        if cu.cuCtxPushCurrent_v2(ctx):
            return None
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        rc = cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        return (int(free.value), int(total.value)) if rc == 0 else None
    finally:
        cu.cuDevicePrimaryCtxRelease_v2(dev)


def headroom_from(free: int, total: int, fraction: float) -> int:
    """JAX's room on a GPU with ``free`` of ``total`` bytes free: what is free less the part of the
    GPU outside its share (the CUDA context and other processes' memory count as used)."""
    return free - round((1.0 - fraction) * total)


def memory_headroom(reserve: int = 0, environ=os.environ) -> int | None:
    """Bytes JAX can still allocate on the first device, less ``reserve``; None where no one says
    (the CPU)."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)) - reserve
    if dev.platform != "gpu":
        return None
    info = cuda_mem_info(getattr(dev, "local_hardware_id", None) or 0)
    if info is None:
        return None
    fraction = float(environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_DEFAULT_FRACTION))
    return headroom_from(*info, fraction) - reserve
