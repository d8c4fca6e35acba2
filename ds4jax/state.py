"""The KV-cache pytree: everything that persists between steps, with static capacities.

    {"n_tokens": int32 [],                     # tokens already processed (= next position)
     "layers": ({"raw": f16 [n_swa, hd],      # raw K=V rows of positions n-n_swa .. n-1, a ring: position p in row p mod n_swa
                 # compressed layers (ratio r > 0), coff = 2 for ratio 4 else 1:
                 "comp": f16 [cap_r, hd],       # compressed rows 0 .. n//r - 1 (rest: not yet visible)
                 "cmp_kv": f32 [coff*r, coff*hd], "cmp_score": f32 [coff*r, coff*hd],  # frontier, a ring
                 # ratio-4 layers (indexer):
                 "idx": f16 [cap_r, idx_hd], "icmp_kv": f32 [8, 2*idx_hd], "icmp_score": ...,
                }, ...)}

A frontier is a ring: the (kv, score) row of position p in row p mod (coff*r), so ratio 4 keeps
window w in half w mod 2 (the other half: the last complete window) and ratio 128 the partial
window; rows of the partial window at or past n mod r are stale (written two windows ago, or
(0, -1e30) from the start) and never read. ``compressor.frontier_view`` gives MODEL.md §5.2's
layout (the last complete window in rows 0..r-1 and the partial one in rows r..r+rem-1 for ratio 4;
the partial one in rows 0..rem-1 otherwise; unused rows (0, -1e30)). Rows are f16 because ds4's CPU reference
rounds cached rows to f16. ``cap_r`` leaves room for one chunk's worth of window slots
past ``ctx // r`` so a chunk can write whole window slots without a bounds clamp.
"""

from __future__ import annotations

import jax.numpy as jnp

from ds4jax.config import ModelConfig
from ds4jax.model.numerics import NEG_INF


def ring_commit(ring, rows, pos0, n):
    """``ring`` [R, ...] after a chunk's first ``n`` rows [T, ...] (positions pos0 + i) go into their
    slots (pos0 + i) mod R; a row that a later committed row overwrites is dropped, so every slot
    gets at most one write. The raw window's and the compressor frontiers' commit."""
    R = ring.shape[0]
    i = jnp.arange(rows.shape[0], dtype=jnp.int32)
    slot = jnp.where((i < n) & (i >= n - R), jnp.mod(pos0 + i, R), R)  # R: out of range, dropped
    return ring.at[slot].set(rows, mode="drop")


def window_slots(ratio: int, chunk: int) -> int:
    """Compression windows a chunk of ``chunk`` tokens can touch (partial ones included)."""
    return -(-(ratio - 1 + chunk) // ratio)


def comp_capacity(ctx: int, ratio: int, chunk: int) -> int:
    return ctx // ratio + window_slots(ratio, chunk)


def _frontier(rows: int, width: int):
    return jnp.zeros((rows, width), jnp.float32), jnp.full((rows, width), NEG_INF, jnp.float32)


def init_state(cfg: ModelConfig, ctx: int, chunk: int) -> dict:
    layers = []
    for L in range(cfg.n_layer):
        d = {"raw": jnp.zeros((cfg.n_swa, cfg.head_dim), jnp.float16)}
        r = cfg.ratio(L)
        if r:
            c = cfg.coff(L)
            cap = comp_capacity(ctx, r, chunk)
            d["comp"] = jnp.zeros((cap, cfg.head_dim), jnp.float16)
            d["cmp_kv"], d["cmp_score"] = _frontier(c * r, c * cfg.head_dim)
            if cfg.has_indexer(L):
                d["idx"] = jnp.zeros((cap, cfg.idx_head_dim), jnp.float16)
                d["icmp_kv"], d["icmp_score"] = _frontier(c * r, c * cfg.idx_head_dim)
        layers.append(d)
    return {"n_tokens": jnp.zeros((), jnp.int32), "layers": tuple(layers)}
