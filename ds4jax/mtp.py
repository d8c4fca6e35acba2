"""The MTP drafter (SPECULATIVE.md §1.4): one extra block that guesses the next token.

A draft step takes the base model's final HC state ``prev_hc`` [n_hc, n_embd] and a token:
the token's embedding (enorm, e_proj) is added to every hnorm'ed, h_proj'ed HC row, the
``mtp.0`` block runs like a base layer with no compression (raw window only, base RoPE
without YaRN, biased top-k routing: ds4 runs it as layer index 1 with no hash table),
then its own HC head and norm feed the base LM head.

Input pairing (which hidden goes with which token) is the seed's (h_{p-1}, t_p): the
hidden of the last committed token with the token just chosen, as DeepSeek-V3 defines
MTP; it is the only pairing the combined verifier can use, since the hidden of t_p does
not exist before t_p is verified.

The MTP keeps its own raw window as a ring indexed by position with the position of
each row, so positions it never ran (after an accepted draft) are holes that attention
skips, instead of stale rows counted as visible (an upstream hole not copied).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ds4jax.config import ModelConfig
from ds4jax.model.attention import ring_positions
from ds4jax.model.forward import embed, layer
from ds4jax.model.hc import hc_head
from ds4jax.model.linear import dense, rms_norms
from ds4jax.model.numerics import F32


def block_config(cfg: ModelConfig) -> ModelConfig:
    """The base config seen by the MTP block: one ratio-0, non-hash layer."""
    return dataclasses.replace(
        cfg, n_layer=1, compress_ratios=(0,), n_hash_layer=0, swiglu_clamp=(cfg.swiglu_clamp[0],)
    )


def init_mtp_state(cfg: ModelConfig) -> dict:
    W = cfg.n_swa
    return {"ring": jnp.zeros((W, cfg.head_dim), jnp.float16), "ring_pos": jnp.full((W,), -1, jnp.int32)}


def draft_step(cfg: ModelConfig, weights: dict, mtp_state: dict, prev_hc, token, pos):
    """(logits [V], out_hc [n_hc, n_embd], mtp_state') for ``token`` at position ``pos``."""
    mcfg = block_config(cfg)
    w = weights["mtp"]
    eps, aq = cfg.rms_eps, cfg.act_quant
    e = embed(weights, token[None], 1)[0, 0]  # [n_embd]
    ((en, eq),) = rms_norms(((e[None], w["enorm"].planes["w"], ("q8_0",)),), eps, aq)
    ep = dense(en, w["e_proj"], aq, eq)[0]
    ((hn, hq),) = rms_norms(((prev_hc, w["hnorm"].planes["w"], ("q8_0",)),), eps, aq)
    hp = dense(hn, w["h_proj"], aq, hq)  # [n_hc, n_embd]
    X = (hp + ep[None, :])[None]  # [1, n_hc, n_embd]

    # The ring as the block's raw window (the base layers' layout: position p in slot p mod W), and
    # which slots hold the position the window expects there (pos - W .. pos - 1).
    W = cfg.n_swa
    have = mtp_state["ring_pos"] == ring_positions(pos, W)
    H, pending, _ = layer(mcfg, 0, w, {"raw": mtp_state["ring"]}, X, token[None], pos, weights["rope"], raw_mask=have)
    new_state = {
        "ring": pending["ring"],  # this step's K=V row in its slot
        "ring_pos": mtp_state["ring_pos"].at[jnp.mod(pos, W)].set(pos),
    }
    h = hc_head(H, w["hc_head_fn"], w["hc_head_scale"].planes["w"], w["hc_head_base"].planes["w"], eps, cfg.hc_eps)
    ((hn, hq),) = rms_norms(((h, w["norm"].planes["w"], ("q8_0",)),), eps, aq)
    logits = dense(hn, weights["output"], aq, hq)[0]
    return logits, H[0], new_state


def draft_margin(logits) -> jax.Array:
    """Logit gap between the MTP's top two tokens (the confidence gate of --mtp_margin): ``lax.top_k``'s
    two values' difference, as two reductions (the max, then the max of the others: a tie gives 0).
    XLA:GPU ran ``top_k(·, 2)`` over the 129,280 logits as a sort kernel of 28 µs a step (H200,
    session 49), where the reductions fuse with the draft's argmax."""
    x = logits.astype(F32)
    first = jnp.argmax(x)
    others = jnp.where(jnp.arange(x.shape[-1]) == first, -jnp.inf, x)
    return x[first] - jnp.max(others)
