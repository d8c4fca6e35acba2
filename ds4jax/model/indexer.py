"""The indexer of ratio-4 layers: which compressed rows each query attends (MODEL.md §4.8).

Scores every visible indexer row, s_c = Σ_h w_h · relu(q_h · k_c), and keeps the
top-k (ties to the lower index). While no more than k rows are visible all of them
are kept, which top-k over the masked scores gives as well.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from ds4jax.config import ModelConfig
from ds4jax.model.linear import dense
from ds4jax.model.numerics import F32, asum, fp4_e2m1_round_trip, rounded, total_order_key
from ds4jax.model.rope import apply_rope_tail
from pallas_kernels import dispatch as kernels

# The XLA path's top-k (prefill chunks, the CPU; a GPU decode step takes the rank launch,
# ``pallas_kernels.indexer_top``, over the visible rows only).
# Up to this many score comparisons (T·n²), the top-k comes from every score's rank (one
# compare-and-count fusion and a scatter) instead of XLA's sort: a decode step's sort of 1,041
# rows took 12.1 µs on an H200 (session 22's profile), once a ratio-4 layer. 8 full-size layers
# (3 ratio-4), one process (H200, session 24): 2,265.2 against 2,288.0 µs of kernels a step with
# the sort. Larger (long contexts, prefill chunks), the sort. 0 turns the rank form off (ab_decode.py
# variants).
RANK_TOP_K_MAX = 1 << 24


def top_indices(scores, k: int):
    """``lax.top_k(scores, k)[1]`` for scores [T, n]: descending in float total order (+0 above
    −0), ties to the lower index. Where T·n² ≤ RANK_TOP_K_MAX, from each score's rank: the count
    of scores above it or equal at a lower index, a permutation of 0..n−1, so rank r < k goes to
    output slot r."""
    T, n = scores.shape
    if T * n * n > RANK_TOP_K_MAX:
        return lax.top_k(scores, k)[1]
    key = total_order_key(scores)
    i = jnp.arange(n, dtype=jnp.int32)
    a, b = key[:, :, None], key[:, None, :]  # [T, i, j]
    beats = (b > a) | ((b == a) & (i[None, :] < i[:, None])[None])
    rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)  # [T, n]
    rows = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, n))
    out = jnp.zeros((T, k), jnp.int32)
    return out.at[rows, rank].set(jnp.broadcast_to(i, (T, n)), mode="drop")  # ranks ≥ k fall off


def head_scores(q, wh, idx_cache):
    """scores [T, cap] = Σ_h wh[t, h]·ReLU(q[t, h]·k) over the compressed rows k [cap, ihd]: every
    product rounded, each sum a double-float sum rounded once (``asum``)."""
    k = idx_cache.astype(F32)  # [cap, ihd]
    dots = jnp.maximum(asum(rounded(q[:, :, None, :] * k[None, None]), -1), 0.0)  # [T, H, cap]
    return asum(rounded(wh[:, :, None] * dots), 1)


def select_rows(cfg: ModelConfig, w: dict, qrn, proj, cos, sin, idx_cache, n_visible):
    """Row indices [T, K] and their validity [T, K] for each query of the chunk.

    ``qrn`` [T, q_lora] is the normed query low-rank, ``proj`` [T, n_idx_head] the normed input
    through ``indexer_proj`` (made by the caller with the compressors' matmuls of that input),
    ``cos``/``sin`` the queries' rope angles, ``n_visible`` [T] the visible row counts.
    """
    T = qrn.shape[0]
    q = dense(qrn, w["indexer_attn_q_b"]).reshape(T, cfg.n_idx_head, cfg.idx_head_dim)
    # tail RoPE, Hadamard, FP4 round trip: one launch on the kernel path
    rotated = lambda: apply_rope_tail(q, cos[:, None, :], sin[:, None, :])
    reference = lambda: fp4_e2m1_round_trip(kernels.hadamard(rotated()), cfg.fp4_block)
    q = kernels.indexer_q(q, cos, sin, cfg.fp4_block, reference)
    wh = proj * F32(1.0 / math.sqrt(cfg.idx_head_dim * cfg.n_idx_head))
    scores = kernels.indexer_scores(q, wh, idx_cache, n_visible, lambda: head_scores(q, wh, idx_cache))
    cap = idx_cache.shape[0]
    K = min(cfg.idx_top_k, cap)

    def reference():
        visible = jnp.arange(cap)[None, :] < n_visible[:, None]
        return top_indices(jnp.where(visible, scores, -jnp.inf), K)  # descending, ties to the lower index

    sel = kernels.indexer_top(scores, n_visible, K, reference)
    return sel, sel < n_visible[:, None]
