"""The FFN sublayer: routed experts + the shared expert (MODEL.md §4.11).

Router probabilities are sqrt(softplus(logits)); the selection bias only picks
which experts (top-k layers); hash layers take their experts from ``tid2eid`` by
token id. Weights are the unbiased probabilities of the chosen experts,
normalised (floor 2^-14) and scaled. SwiGLU clamps gate above only and up on
both sides; the router weight multiplies the mid vector before the down
projection, which sees it Q8_K-quantized as in ds4's CPU path.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ds4jax.config import ModelConfig
from ds4jax.model.linear import dense, dense_many, expert_linear, expert_linears
from ds4jax.model.numerics import F32, asum, div, softplus, sqrt, with_terms
from pallas_kernels import dispatch as kernels


def route(cfg: ModelConfig, L: int, w: dict, z, tokens):
    """(expert ids [T, k] int32, weights [T, k] f32)."""
    probs = sqrt(softplus(dense(z, w["ffn_gate_inp"])))  # [T, n_expert]
    if cfg.is_hash_layer(L):
        sel = w["ffn_gate_tid2eid"].planes["w"][tokens].astype(jnp.int32)
    else:
        biased = probs + w["exp_probs_b"].planes["w"].astype(F32) if "exp_probs_b" in w else probs
        _, sel = lax.top_k(biased, cfg.n_expert_used)  # ties to the lower index
    p = jnp.take_along_axis(probs, sel, axis=-1)
    wt = div(p, jnp.maximum(asum(p)[:, None], F32(2.0**-14))) * F32(cfg.expert_weights_scale)
    return sel, wt


def ffn_parts(cfg: ModelConfig, L: int, w: dict, z, tokens, pre=None):
    """The FFN's output before its last sum: (shared [T, n_embd], routed [T, k, n_embd]), the shared
    expert's and each routed expert's (weighted), or their launches' ``SplitSums`` (routed: of the
    T·k rows) on the kernel path. ``ffn_sublayer`` sums them; the post-mix's kernel
    takes them as they are (``hc.hc_post_carry``'s terms). z, tokens, ``pre``: as ``ffn_sublayer``."""
    clamp = cfg.swiglu_clamp[L]
    sel, wt = route(cfg, L, w, z, tokens)
    aq = cfg.act_quant
    zk = z[:, None]  # [T, 1, n_embd]: broadcast over the k experts (quantized once per token)
    # [T, k, n_ff] each, or the launch's partials, added by the launch that takes the SwiGLU, the
    # router weight and the down kernel's int8 blocks (``dispatch.swiglu_quant``)
    g, u = expert_linears(zk, (w["ffn_gate_exps"], w["ffn_up_exps"]), sel, aq, pre, split="routed")
    mid, mid_pre = kernels.swiglu_quant(g, u, clamp, aq, weights=wt)
    routed = expert_linear(mid, w["ffn_down_exps"], sel, aq, mid_pre, split="post_terms")

    # One launch on the kernel path, its partials added by the launch that makes the SwiGLU's int8
    # blocks for the down projection (``dispatch.swiglu_quant``: where it runs, ``mid`` is dead code).
    gs, us = dense_many(z, (w["ffn_gate_shexp"], w["ffn_up_shexp"]), aq, pre, split="swiglu")
    mid, mid_pre = kernels.swiglu_quant(gs, us, clamp, aq)
    shared = dense(mid, w["ffn_down_shexp"], aq, mid_pre, split="post")
    return shared, routed


def ffn_sublayer(cfg: ModelConfig, L: int, w: dict, z, tokens, pre=None):
    """z [T, n_embd] (ffn_norm output), tokens [T] -> [T, n_embd]: Σ over the routed experts (one
    double-float sum, rounded once) + the shared expert (``numerics.with_terms``). ``pre``: z's Q8_0
    and Q8_K quantizations from the norm's launch (``linear.rms_norms``), or None."""
    shared, routed = ffn_parts(cfg, L, w, z, tokens, pre)
    return with_terms(kernels.value_of(shared), kernels.term_rows(routed, z.shape[0]))
