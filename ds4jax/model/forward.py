"""The whole model over a chunk of tokens: embedding -> layers -> head (MODEL.md §4.14).

``forward(cfg, weights, state, tokens, n_valid, logits_rows)`` is pure (``weights`` carries
the model's planes plus ``weights["rope"]``, the ``rope_tables`` for the context): it returns
logits and the new state after the first ``n_valid`` tokens of the chunk (the rest
is padding that never reaches the state). Decode is the same function with T = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ds4jax.config import ModelConfig
from ds4jax.model.attention import attention_sublayer, commit_layer
from ds4jax.model.hc import hc_head, hc_post_carry, hc_pre
from ds4jax.model.linear import dense, rms_norms
from ds4jax.model.moe import ffn_parts
from ds4jax.model.numerics import F32


def embed(weights: dict, tokens: jax.Array, n_hc: int) -> jax.Array:
    e = weights["token_embd"].planes["w"][tokens].astype(F32)  # [T, n_embd]
    return jnp.broadcast_to(e[:, None, :], (e.shape[0], n_hc, e.shape[1]))


def layer(cfg: ModelConfig, L: int, w: dict, st: dict, H, tokens, pos0, rope: dict, raw_mask=None, squares=None):
    """One block on the HC state H [T, n_hc, n_embd]: (H', pending layer state, squares). ``squares``
    goes with H from one post-mix to the next pre-mix (Σ H² on the kernel path, else None)."""
    it, eps, heps = cfg.hc_sinkhorn_iter, cfg.rms_eps, cfg.hc_eps
    x, post, comb = hc_pre(
        H, w["hc_attn_fn"], w["hc_attn_scale"].planes["w"], w["hc_attn_base"].planes["w"], it, eps, heps, squares
    )
    y, pending = attention_sublayer(cfg, L, w, st, x, pos0, rope, raw_mask)
    H, squares = hc_post_carry(H, y, post, comb)
    x, post, comb = hc_pre(
        H, w["hc_ffn_fn"], w["hc_ffn_scale"].planes["w"], w["hc_ffn_base"].planes["w"], it, eps, heps, squares
    )
    ((z, zq),) = rms_norms(((x, w["ffn_norm"].planes["w"], ("q8_0", "q8_k")),), eps, cfg.act_quant)
    shared, routed = ffn_parts(cfg, L, w, z, tokens, zq)
    H, squares = hc_post_carry(H, shared, post, comb, routed)  # the FFN's sum inside the post-mix
    return H, pending, squares


def layer_committed(cfg: ModelConfig, L: int, w: dict, st: dict, H, tokens, pos0, n, rope: dict, squares=None):
    """``layer`` with its state committed after the chunk's first ``n`` tokens: (H', the layer's new
    state, squares); ``forward_hidden`` then ``commit``, one block at a time (the layered prefill)."""
    H, pending, squares = layer(cfg, L, w, st, H, tokens, pos0, rope, squares=squares)
    return H, commit_layer(cfg, L, pending, pos0, n), squares


def layer_kind(cfg: ModelConfig, L: int) -> tuple:
    """What block L's computation takes from the config besides its weights and state: blocks of
    one kind run the same program (the model functions read these through L and nothing else)."""
    return (cfg.ratio(L), cfg.ratio(L) and cfg.coff(L), cfg.has_indexer(L), cfg.is_hash_layer(L), cfg.swiglu_clamp[L])


def head(cfg: ModelConfig, weights: dict, H) -> jax.Array:
    h = hc_head(
        H,
        weights["output_hc_fn"],
        weights["output_hc_scale"].planes["w"],
        weights["output_hc_base"].planes["w"],
        cfg.rms_eps,
        cfg.hc_eps,
    )
    ((hn, hq),) = rms_norms(((h, weights["output_norm"].planes["w"], ("q8_0",)),), cfg.rms_eps, cfg.act_quant)
    return dense(hn, weights["output"], cfg.act_quant, hq)


def forward_hidden(cfg: ModelConfig, weights: dict, state: dict, tokens):
    """Run the layers over the chunk: (final HC state H [T, n_hc, n_embd], pending states)."""
    pos0 = state["n_tokens"]
    H = embed(weights, tokens, cfg.n_hc)
    pending, squares = [], None
    for L in range(cfg.n_layer):
        w, st = weights["layers"][L], state["layers"][L]
        H, p, squares = layer(cfg, L, w, st, H, tokens, pos0, weights["rope"], squares=squares)
        pending.append(p)
    return H, pending


def commit(cfg: ModelConfig, state: dict, pending: list, n) -> dict:
    """The state after the chunk's first ``n`` tokens (``n`` may be traced)."""
    pos0 = state["n_tokens"]
    layers = tuple(commit_layer(cfg, L, p, pos0, n) for L, p in enumerate(pending))
    return {"n_tokens": pos0 + n, "layers": layers}


def forward(cfg: ModelConfig, weights: dict, state: dict, tokens, n_valid, logits_rows: str = "last"):
    """logits_rows: "last" -> logits [n_vocab] of token n_valid-1; "all" -> [T, n_vocab].

    Padding rows (index >= n_valid) are computed but never reach the state."""
    H, pending = forward_hidden(cfg, weights, state, tokens)
    state = commit(cfg, state, pending, n_valid)
    if logits_rows == "last":
        H = jax.lax.dynamic_index_in_dim(H, n_valid - 1, axis=0, keepdims=False)
    return head(cfg, weights, H), state
