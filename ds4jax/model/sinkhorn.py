"""Sinkhorn normalisation of the hyper-connection stream mix (MODEL.md §4.4), one function for
the XLA path and the Pallas kernel (pallas_kernels/sinkhorn.py), which runs it on its tile."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ds4jax.model.numerics import F32, chain_sum, div, exp, rounded, take


def sinkhorn(c: jax.Array, n_iter: int, hc_eps: float, rnd=rounded, take=take) -> jax.Array:
    """Sinkhorn normalisation of the [.., n, n] stream-mix logits, as ds4: softmax rows (+eps),
    normalise columns; then (rows, columns) n_iter-1 times; reciprocals multiplied throughout.

    The n-element sums and maxima are unrolled elementwise chains (``chain_sum``), not
    reductions: as reductions it was ~40 kernels per sublayer. ``rnd``/``take`` let the
    Pallas kernel run this same function."""
    n = c.shape[-1]
    eps = F32(hc_eps)
    row_sum = lambda c: chain_sum(c, -1, take)[..., :, None]
    col_sum = lambda c: chain_sum(c, -2, take)[..., None, :]
    row_max = functools.reduce(jnp.maximum, [take(c, c.ndim - 1, j) for j in range(n)])
    c = exp(c - row_max[..., :, None], rnd)
    # Every product is rounded before the sums that read it (no FMA, on any backend).
    c = rnd(c * div(1.0, row_sum(c), rnd)) + eps
    c = rnd(c * div(1.0, col_sum(c) + eps, rnd))
    for _ in range(n_iter - 1):
        c = rnd(c * div(1.0, row_sum(c) + eps, rnd))
        c = rnd(c * div(1.0, col_sum(c) + eps, rnd))
    return c
