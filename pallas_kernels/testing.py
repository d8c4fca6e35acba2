"""Random kernel inputs for the tests and the benchmark (valid planes: any bytes are blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ds4jax.quant.layouts import iq2_nib_planes
from pallas_kernels import experts


def expert_planes(key: jax.Array, qtype: int, E: int, out: int, nb: int) -> dict:
    """Planes of E random experts [E, out, nb super-blocks] of ``qtype`` (scales in [1e-4, 1e-2])."""
    if qtype in experts.LAYOUTS:  # a load-time layout: random IQ2_XXS planes, repacked
        return iq2_nib_planes(expert_planes(key, experts.IQ2_XXS, E, out, nb))
    ks = iter(jax.random.split(key, 8))

    def u8(*shape, hi=256):
        return jax.random.randint(next(ks), shape, 0, hi, jnp.int32).astype(jnp.uint8)

    def f16(*shape):
        return jax.random.uniform(next(ks), shape, jnp.float32, 1e-4, 1e-2).astype(jnp.float16)

    if qtype == experts.Q4_K:
        return {
            "qs": u8(E, out, nb, 128),
            "sc": u8(E, out, nb, 8, hi=64),
            "m": u8(E, out, nb, 8, hi=64),
            "d": f16(E, out, nb),
            "dmin": f16(E, out, nb),
        }
    if qtype == experts.Q2_K:
        return {"qs": u8(E, out, nb, 64), "sc": u8(E, out, nb, 16), "d": f16(E, out, nb), "dmin": f16(E, out, nb)}
    return {
        "grid": u8(E, out, nb, 32),
        "aux": jax.random.bits(next(ks), (E, out, nb, 8), jnp.uint32),
        "d": f16(E, out, nb),
    }
