"""Which part of the no-pad Q8_0 kernel breaks on a GPU: masked token loads, masked stores, both?

    JAX_PLATFORMS=cuda python speed-bench/q8_masking.py

Builds the Q8_0 kernel body (``q8_0._kernel``, two-output split-K form) four ways — the token
rows past N read by masked loads or from a pad, the partials stored into N-row outputs (masked)
or 4-row ones — and prints, per shape, whether each output equals ``q8_0.reference`` bit for
bit (run 13 in KERNELS.md). Off GPU the kernels run interpreted (all exact there).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import q8_0
from pallas_kernels.common import F32, finish

I32 = jnp.int32
VARIANTS = (  # name, mask the loads, mask the stores, pipeline stages
    ("loads+stores st3", True, True, 3),
    ("loads+stores st1", True, True, 1),
    ("loads st3", True, False, 3),
    ("loads st1", True, False, 1),
    ("stores st3", False, True, 3),
    ("pads st3", False, False, 3),
)


def call(xq, dx, qs, d, cfg, mask_loads, mask_stores, stages):
    n, (out, k) = xq.shape[0], qs.shape
    nb, U, BO, S = k // 32, cfg.blocks_per_step, cfg.block_rows, cfg.k_splits
    np_ = max(q8_0.pow2_at_least(n), 16 // U)
    if not mask_loads:
        xq, dx = jnp.pad(xq, ((0, np_ - n), (0, 0))), jnp.pad(dx, ((0, np_ - n), (0, 0)))
    rows = n if mask_stores else np_
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)
    res = pl.pallas_call(
        functools.partial(q8_0._kernel, cfg=cfg, steps=nb // U // S, np_=np_),
        grid=(out // BO, S),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,))] * 2
        + [pl.BlockSpec((np_, k), lambda i, j: (0, 0)), pl.BlockSpec((np_, nb), lambda i, j: (0, 0))]
        + [whole(qs[None]), whole(d[None])],
        out_specs=[pl.BlockSpec((None, np_, BO), lambda i, j: (j, 0, i))] * 2,
        out_shape=[jax.ShapeDtypeStruct((S, rows, out), F32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=stages),
        interpret=jax.default_backend() == "cpu",
    )(jnp.zeros((1,), I32), jnp.zeros((1,), I32), xq, dx, qs[None], d[None])
    return finish(*res)[:n]


def main() -> None:
    rng = np.random.default_rng(0)
    for out, k, U, S in ((48, 96, 1, 1), (112, 320, 2, 1), (64, 2048, 4, 2), (64, 512, 4, 4), (512, 4096, 4, 8)):
        xq = jnp.asarray(rng.integers(-128, 128, (1, k), dtype=np.int8))
        dx = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, k // 32)).astype(np.float32))
        qs = jnp.asarray(rng.integers(-128, 128, (out, k), dtype=np.int8))
        d = jnp.asarray(rng.uniform(1e-4, 1e-2, (out, k // 32)).astype(np.float16))
        want = np.asarray(q8_0.reference(xq, dx, qs, d))
        cfg = q8_0.TileConfig(block_rows=16, k_splits=S, blocks_per_step=U)
        cells = []
        for name, ml, ms, st in VARIANTS:
            fn = jax.jit(functools.partial(call, cfg=cfg, mask_loads=ml, mask_stores=ms, stages=st))
            try:
                cells.append(f"{name}: {'exact' if np.array_equal(np.asarray(fn(xq, dx, qs, d)), want) else 'WRONG'}")
            except Exception as e:  # noqa: BLE001  (a variant that does not build is reported)
                cells.append(f"{name}: {type(e).__name__}")
        print(f"{out}x{k} U{U} s{S}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
