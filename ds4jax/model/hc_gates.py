"""The hyper-connection mixer's gates (MODEL.md §4.4): one function for the XLA path
(``ds4jax.model.hc.hc_pre``) and the fused kernel (``pallas_kernels/hc_pre.py``), which runs it
with its own rounding barrier ``rnd``: the same arithmetic, so the same bits."""

from __future__ import annotations

from ds4jax.model.numerics import F32, rounded, sigmoid


def gates(mix_pre, mix_post, mix_comb, scales, base_pre, base_post, base_comb, hc_eps: float, rnd=rounded):
    """(pre, post, comb logits) from the mixer's three parts and the (pre, post, comb) scales:
    pre = σ(m·s0 + b) + eps, post = 2σ(m·s1 + b), comb = m·s2 + b (Sinkhorn-normalised later)."""
    s0, s1, s2 = scales
    pre = sigmoid(rnd(mix_pre * s0) + base_pre, rnd) + F32(hc_eps)
    post = 2.0 * sigmoid(rnd(mix_post * s1) + base_post, rnd)
    comb = rnd(mix_comb * s2) + base_comb
    return pre, post, comb
