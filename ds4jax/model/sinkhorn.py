"""Sinkhorn normalisation of the hyper-connection stream mix (MODEL.md §4.4), one function for
the XLA path and the Pallas kernel (pallas_kernels/sinkhorn.py), which runs it on its tile."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ds4jax.model.numerics import F32, asum, chain_sum, div, exp, rounded


def sinkhorn(c: jax.Array, n_iter: int, hc_eps: float, rnd=rounded, take=None) -> jax.Array:
    """Sinkhorn normalisation of the [.., n, n] stream-mix logits, as ds4: softmax rows (+eps),
    normalise columns; then (rows, columns) n_iter-1 times; reciprocals multiplied throughout.

    The XLA path sums with ``asum`` (a reduce each). A kernel passes its rounding barrier
    ``rnd`` and register pick ``take``, and the n-element sums become unrolled TwoSum chains
    (``chain_sum``): the same correctly rounded sums, so the same bits. (Chains on the XLA
    path too cut XLA:CPU's fusions by a third but made the model's compiles ~40 % slower.)"""
    n = c.shape[-1]
    eps = F32(hc_eps)
    if take is None:
        row_sum = lambda c: asum(c, -1)[..., :, None]
        col_sum = lambda c: asum(c, -2)[..., None, :]
        row_max = jnp.max(c, axis=-1)
    else:
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
