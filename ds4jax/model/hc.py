"""Manifold-constrained hyper-connections (MODEL.md §4.4, §4.12).

The residual state is H [.., n_hc, n_embd]. Before each sublayer a mixer reads the
RMS-normalised flattened H and yields ``pre`` (how the streams combine into the
sublayer input), ``post`` (how the output is written back) and ``comb`` (a
Sinkhorn-normalised n_hc x n_hc stream mix). Mixer layout: [pre | post | comb row-major].
"""

from __future__ import annotations

import jax

from ds4jax.model.hc_gates import gates
from ds4jax.model.linear import FLOAT_TYPES, dense
from ds4jax.model.numerics import F32, asum, rms_norm, rounded, sigmoid, with_terms
from ds4jax.quant.formats import QType
from pallas_kernels import dispatch as kernels


def _mixer(H: jax.Array, fn, eps: float) -> jax.Array:
    flat = H.reshape(*H.shape[:-2], H.shape[-2] * H.shape[-1])
    return dense(rms_norm(flat, None, eps), fn)


def hc_pre(
    H: jax.Array, fn, scale: jax.Array, base: jax.Array, n_iter: int, rms_eps: float, hc_eps: float, squares=None
):
    """Returns (x [.., n_embd], post [.., n_hc], comb [.., n_hc, n_hc]). Decode and the verifier
    take the kernels where dispatch says so (three launches for ~10 XLA fusions): the same bits.
    ``squares``: what ``hc_post_carry`` returned with H (the kernel path's Σ H²), or None."""
    plain = fn.planes["w"] if QType(fn.qtype) in FLOAT_TYPES else None
    reference = lambda: _hc_pre(H, fn, scale, base, n_iter, rms_eps, hc_eps)
    return kernels.hc_pre(H, plain, scale, base, n_iter, rms_eps, hc_eps, reference, squares)


def _hc_pre(H, fn, scale, base, n_iter, rms_eps, hc_eps):
    n = H.shape[-2]
    mix = _mixer(H, fn, rms_eps)
    scale, base = scale.astype(F32), base.astype(F32)
    parts = (mix[..., :n], mix[..., n : 2 * n], mix[..., 2 * n :])
    pre, post, c = gates(*parts, (scale[0], scale[1], scale[2]), base[:n], base[n : 2 * n], base[2 * n :], hc_eps)
    c = kernels.sinkhorn(c.reshape(*mix.shape[:-1], n, n), n_iter, hc_eps)
    x = asum(rounded(pre[..., :, None] * H), -2)
    return x, post, c


def hc_post(H: jax.Array, y: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """New stream j = post_j * y + Σ_a comb[a, j] * H[a] (column j of comb)."""
    mixed = asum(rounded(comb[..., :, :, None] * H[..., :, None, :]), -3)  # [.., j, d] = Σ_a C[a, j] H[a]
    return rounded(post[..., :, None] * y[..., None, :]) + mixed


def hc_post_carry(H: jax.Array, y: jax.Array, post: jax.Array, comb: jax.Array, terms=None):
    """(``hc_post``'s H', squares): on the kernel path (decode and the verifier) one launch that
    also sums Σ H'² for the next ``hc_pre``; elsewhere squares is None. The same H' bits.
    ``terms`` [T, k, d] or None: the sublayer's output is then Σ_k terms + y (``with_terms``). y and
    terms may be their launches' unfinished outputs (``SplitSums``), which the kernel adds itself."""
    T = H.shape[0]
    ref = lambda: hc_post(H, with_terms(kernels.value_of(y), kernels.term_rows(terms, T)), post, comb)
    return kernels.hc_post(H, y, post, comb, ref, terms)


def hc_head(H: jax.Array, fn, scale: jax.Array, base: jax.Array, rms_eps: float, hc_eps: float) -> jax.Array:
    """Collapse the streams before the final norm: h = Σ_s (σ(mix_s*scale + base_s) + eps) H[s]."""
    mix = _mixer(H, fn, rms_eps)
    w = sigmoid(rounded(mix * scale.astype(F32)[0]) + base.astype(F32)) + F32(hc_eps)
    return asum(rounded(w[..., :, None] * H), -2)
