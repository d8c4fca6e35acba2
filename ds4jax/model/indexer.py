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
from ds4jax.model.numerics import F32, asum, fp4_e2m1_round_trip, rounded
from ds4jax.model.rope import apply_rope_tail
from pallas_kernels import dispatch as kernels


def select_rows(cfg: ModelConfig, w: dict, qrn, xn, cos, sin, idx_cache, n_visible):
    """Row indices [T, K] and their validity [T, K] for each query of the chunk.

    ``qrn`` [T, q_lora] is the normed query low-rank, ``xn`` [T, n_embd] the normed input,
    ``cos``/``sin`` the queries' rope angles, ``n_visible`` [T] the visible row counts.
    """
    T = qrn.shape[0]
    q = dense(qrn, w["indexer_attn_q_b"]).reshape(T, cfg.n_idx_head, cfg.idx_head_dim)
    q = apply_rope_tail(q, cos[:, None, :], sin[:, None, :])
    q = fp4_e2m1_round_trip(kernels.hadamard(q), cfg.fp4_block)
    wh = dense(xn, w["indexer_proj"]) * F32(1.0 / math.sqrt(cfg.idx_head_dim * cfg.n_idx_head))
    k = idx_cache.astype(F32)  # [cap, ihd]
    dots = jnp.maximum(asum(rounded(q[:, :, None, :] * k[None, None]), -1), 0.0)  # [T, H, cap]
    scores = asum(rounded(wh[:, :, None] * dots), 1)
    cap = k.shape[0]
    visible = jnp.arange(cap)[None, :] < n_visible[:, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    K = min(cfg.idx_top_k, cap)
    _, sel = lax.top_k(scores, K)  # descending, ties to the lower index
    return sel, sel < n_visible[:, None]
