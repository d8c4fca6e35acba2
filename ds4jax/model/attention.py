"""The attention sublayer, chunk form (MODEL.md §4.5, §4.9, §4.10).

One K=V vector per token (RMS-normed, tail-roped, FP8-simulated on the non-rotary
dims, stored f16) serves all query heads. Each query attends to the raw window
(the last n_swa tokens including itself) plus, on compressed layers, the visible
compressed rows (ratio-4: the indexer's top-k), with a per-head sink in the
softmax denominator. Outputs are un-roped and go through the grouped projection.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ds4jax.config import ModelConfig
from ds4jax.model import compressor, indexer
from ds4jax.model.linear import dense, dense_many, q8_0_grouped_matmul, rms_norms
from ds4jax.model.numerics import F32, asum, div, exp, f16_round, fp8_e4m3_head, rounded
from ds4jax.model.rope import apply_rope_tail, rope_angles
from ds4jax.state import ring_commit
from pallas_kernels import dispatch as kernels


def _scores(q, k):
    """q [T, H, hd] against keys shared by the chunk [R, hd] or per query [T, R, hd] -> [T, H, R]."""
    kk = k[None, None] if k.ndim == 2 else k[:, None]
    return asum(rounded(q[:, :, None, :] * kk), -1)


def _mix(p, k):
    """Σ_r p[t, h, r] k[r, :] -> [T, H, hd]."""
    kk = k[None, None] if k.ndim == 2 else k[:, None]
    return asum(rounded(p[..., None] * kk), -2)


def sink_attention(q, parts, sink, scale):
    """Softmax over the union of key sets with a per-head sink logit in the denominator only.

    ``parts``: (keys [R, hd] or [T, R, hd], valid [T, R]); K = V.
    """
    s = [jnp.where(v[:, None, :], _scores(q, k) * scale, -jnp.inf) for k, v in parts]
    m = jnp.maximum(jnp.max(jnp.concatenate(s, axis=-1), axis=-1), sink[None, :])  # [T, H]
    e = [exp(si - m[..., None]) for si in s]
    den = exp(sink[None, :] - m) + asum(jnp.concatenate(e, axis=-1), -1)
    o = _mix(e[0], parts[0][0])
    for ei, (k, _) in zip(e[1:], parts[1:]):
        o = o + _mix(ei, k)
    return o * div(1.0, den)[..., None]  # ds4 normalises with a reciprocal multiply


def f32_keys(parts) -> list:
    """Key sets as (f16 table [R, hd], rows [T, K] or None for all R, visible) → the reference's
    (f32 keys [R, hd] or [T, K, hd], visible)."""
    return [(t.astype(F32) if rows is None else t.astype(F32)[rows], v) for t, rows, v in parts]


def ring_positions(pos0, W: int):
    """The position each slot of a raw-window ring holds before position pos0: the one in
    [pos0 - W, pos0) congruent to the slot mod W (negative: no token yet)."""
    return pos0 - W + jnp.mod(jnp.arange(W, dtype=jnp.int32) - pos0, W)


def kv_row_values(kv, cos, sin, cfg: ModelConfig):
    """The normed KV rows [T, hd] as the raw window stores them: tail RoPE (cos/sin [T, n_rot/2]),
    the FP8 round trip of the non-rotary dims, f16 (exact: already on the f16 grid)."""
    kv = fp8_e4m3_head(apply_rope_tail(kv, cos, sin), cfg.n_nope, cfg.fp8_block)
    return f16_round(kv).astype(jnp.float16)


def attention_sublayer(cfg: ModelConfig, L: int, w: dict, st: dict, x, pos0, rope: dict, raw_mask=None):
    """x [T, n_embd] (HC-pre output) -> (y [T, n_embd], or its launch's ``SplitSums`` on the kernel
    path, for ``hc.hc_post_carry``; pending).

    ``pending`` holds what the chunk adds to the layer state; ``commit_layer`` turns it into
    the state after any number of the chunk's tokens (all for prefill and decode; the
    accepted prefix for the speculative verifier). ``rope``: the rope_tables. ``raw_mask``
    [n_swa] marks which stored raw rows exist (default: all at their positions)."""
    T = x.shape[0]
    H, hd, eps = cfg.n_head, cfg.head_dim, cfg.rms_eps
    pos = pos0 + jnp.arange(T, dtype=jnp.int32)
    cos, sin = rope_angles(pos, cfg, L, rope)  # [T, n_rot/2]

    aq = cfg.act_quant
    # Each norm launch also quantizes its output for the Q8_0 kernels that read it (kernel path).
    ((xn, xq),) = rms_norms(((x, w["attn_norm"].planes["w"], ("q8_0",)),), eps, aq)
    # One input: one launch on the kernel path, whose K-split partials the norms' launch adds.
    qa, kva = dense_many(xn, (w["attn_q_a"], w["attn_kv"]), aq, xq, split="norm")
    pair = ((qa, w["attn_q_a_norm"].planes["w"], ("q8_0",)), (kva, w["attn_kv_a_norm"].planes["w"], ()))
    # Raw window: a ring, position p in slot p mod n_swa (``state.py``). Every sum over keys is a
    # double-float sum rounded once, so the keys' order does not change the bits.
    # Decode: the token's row goes into its slot first, over the one row leaving the window, in
    # place in the donated window (on the kernel path, by the norms' launch that makes the row).
    # Shifting the window instead (a concatenation with the row, then a slice) cost a copy and a
    # concatenation a layer: 2 kernels, ~3.7 µs (H200, session 26).
    W = cfg.n_swa
    here = pos0 % W
    ring = (st["raw"], here) if T == 1 else None
    kv_row = (cos, sin, cfg.n_nope, cfg.fp8_block, lambda kv: kv_row_values(kv, cos, sin, cfg), ring)
    (qrn, qq), (kv16, _) = rms_norms(pair, eps, aq, kv_row)  # Q_A and KV_A in one launch
    q = dense(qrn, w["attn_q_b"], aq, qq).reshape(T, H, hd)
    q = kernels.head_norm_rope(q, cos, sin, eps)  # per-head weightless norm, then the tail RoPE

    if T == 1:
        slots = jnp.arange(W, dtype=jnp.int32)
        raw_keys = kv16  # the window with the token's row in its slot
        kpos = pos0 - jnp.mod(pos0 - slots, W)  # slot s: the position in (pos0 - W, pos0] ≡ s
        raw_valid = (kpos >= 0)[None, :]
        if raw_mask is not None:  # stored rows that hold no token (the MTP window's holes)
            raw_valid = raw_valid & (raw_mask | (slots == here))[None, :]
        pending = {"ring": raw_keys}
    else:
        # A chunk: the stored rows, then the chunk's (whose rows ``commit_layer`` writes into the ring).
        raw_keys = jnp.concatenate([st["raw"], kv16], axis=0)  # [W + T, hd]
        kpos = jnp.concatenate([ring_positions(pos0, W), pos])
        raw_valid = (kpos[None, :] >= 0) & (kpos[None, :] <= pos[:, None]) & (kpos[None, :] > pos[:, None] - W)
        if raw_mask is not None:
            raw_valid = raw_valid & jnp.concatenate([raw_mask, jnp.ones((T,), bool)])[None, :]
        pending = {"ring": st["raw"], "rows": kv16}

    # Each key set as (f16 table, rows each token reads or None for all of them, visible): the
    # kernel reads rows by index, the reference gathers them as f32.
    parts = [(raw_keys, None, raw_valid)]
    r = cfg.ratio(L)
    if r:
        # Every float-weight matmul of the normed input (the compressors' kv and gate, the indexer's
        # projection): one launch on the kernel path.
        names = compressor.projections("attn_compressor")
        if cfg.has_indexer(L):
            names += (*compressor.projections("indexer_compressor"), "indexer_proj")
        proj = dense_many(xn, tuple(w[nm] for nm in names))
        comp, pending["cmp_front"] = compressor.compress_chunk(
            cfg, L, w, "attn_compressor", proj[:2], pos0, st["comp"], st["cmp_kv"], st["cmp_score"], rope
        )
        pending["comp"] = comp
        n_vis = compressor.visible_rows(pos, r)  # [T]
        if cfg.has_indexer(L):
            idx, pending["icmp_front"] = compressor.compress_chunk(
                cfg, L, w, "indexer_compressor", proj[2:4], pos0, st["idx"], st["icmp_kv"], st["icmp_score"], rope
            )
            pending["idx"] = idx
            sel, ok = indexer.select_rows(cfg, w, qrn, proj[4], cos, sin, idx, n_vis)
            parts.append((comp, sel, ok))  # the indexer's top-k rows [T, K]
        else:
            parts.append((comp, None, jnp.arange(comp.shape[0])[None, :] < n_vis[:, None]))

    sink = w["attn_sinks"].planes["w"].astype(F32)
    scale = np.float32(1.0 / math.sqrt(hd))  # a host scalar: the kernel path takes it as a literal
    ref = lambda: sink_attention(q, f32_keys(parts), sink, scale)
    # ``o_pre``: the output projection's int8 input (the rotated o's quantization) where the attention's
    # epilogue launch makes it; the projection then reads only that, and XLA drops o's rotation.
    o, o_pre = kernels.sink_attention(q, tuple(parts), sink, scale, ref, (cos, sin) if aq else None)

    o = apply_rope_tail(o, cos[:, None, :], sin[:, None, :], inverse=True)
    o = o.reshape(T, cfg.n_out_group, cfg.group_dim)
    # [T, out_low_dim], or the grouped launch's partials, which the quantize launch before attn_output_b adds
    low = q8_0_grouped_matmul(o, w["attn_output_a"], cfg.n_out_group, aq, o_pre, split="quant")
    y = dense(low, w["attn_output_b"], aq, split="post")  # may be SplitSums
    return y, pending


def commit_layer(cfg: ModelConfig, L: int, pending: dict, pos0, n) -> dict:
    """The layer state after the chunk's first ``n`` tokens.

    Compressed-row caches need no cut: rows past ``(pos0 + n) // ratio`` are invisible
    until a later chunk rewrites them. A one-token chunk (decode) always commits its token (its
    rows are in the rings already: the raw window's and the compressors' frontiers)."""
    raw = pending["ring"]
    st = {"raw": ring_commit(raw, pending["rows"], pos0, n) if "rows" in pending else raw}
    if cfg.ratio(L):
        st["comp"] = pending["comp"]
        st["cmp_kv"], st["cmp_score"] = compressor.commit_frontier(cfg, L, pending["cmp_front"], pos0, n)
        if cfg.has_indexer(L):
            st["idx"] = pending["idx"]
            st["icmp_kv"], st["icmp_score"] = compressor.commit_frontier(cfg, L, pending["icmp_front"], pos0, n)
    return st
