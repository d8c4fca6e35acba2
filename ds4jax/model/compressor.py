"""Compressors of ratio-4 (overlapping) and ratio-r layers, chunk form (MODEL.md §4.7).

A chunk of T tokens (the first ``n_valid`` real) is laid into a window-aligned buffer
behind the frontier, every window slot is pooled at once, and only the complete
ones count: they are appended to the cache at row ``n // r``. The frontier is kept as a
ring (``state.py``): the committed rows go into their slots, and the frontier of MODEL.md §5.2
is a view of the ring (``frontier_view``). Decode writes its row into its slot in place (one
launch with the pooling on the kernel path), so prefill, chunked prefill and decode reach the
same state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ds4jax.config import ModelConfig
from ds4jax.model.numerics import (
    F32,
    NEG_INF,
    NO_SCORE,
    asum,
    div,
    exp,
    f16_round,
    fp4_e2m1_round_trip,
    fp8_e4m3_head,
    rms_norm,
    rounded,
)
from ds4jax.model.rope import apply_rope_tail, rope_angles
from ds4jax.state import ring_commit, window_slots
from pallas_kernels import dispatch as kernels


def _pool(buf_kv, buf_sc, ratio: int, coff: int, hd: int, n_slots: int):
    """Softmax-pool every window slot: [n_slots, hd]."""
    P = ratio if coff == 2 else 0
    cur_kv = buf_kv[P:].reshape(n_slots, ratio, coff * hd)
    cur_sc = buf_sc[P:].reshape(n_slots, ratio, coff * hd)
    if coff == 2:  # previous window through the first half, current through the second
        prev_kv = buf_kv[: n_slots * ratio].reshape(n_slots, ratio, 2 * hd)
        prev_sc = buf_sc[: n_slots * ratio].reshape(n_slots, ratio, 2 * hd)
        kv = jnp.concatenate([prev_kv[..., :hd], cur_kv[..., hd:]], axis=1)
        sc = jnp.concatenate([prev_sc[..., :hd], cur_sc[..., hd:]], axis=1)
    else:
        kv, sc = cur_kv, cur_sc
    m = jnp.max(sc, axis=1, keepdims=True)
    e = exp(sc - m)
    pooled = div(asum(rounded(e * kv), 1), asum(e, 1))
    return jnp.where(m[:, 0] <= NO_SCORE, 0.0, pooled)  # a window with no real scores pools to 0


def row_values(rows, norm_w, cos, sin, eps: float, round_trip):
    """A compressor's new rows as its cache stores them (f32 on the f16 grid): the pooled rows [S,
    hd] normed, their tail rotated to the window's start (cos/sin [S, n_rot/2]), then
    ``round_trip`` (the attention's FP8 head, or the indexer's Hadamard and FP4)."""
    return f16_round(round_trip(apply_rope_tail(rms_norm(rows, norm_w, eps), cos, sin)))


def frontier_view(ring_kv, ring_sc, pos0, ratio: int, coff: int):
    """The frontier before position ``pos0`` as MODEL.md §5.2 lays it out, from the ring: ratio 4
    (coff 2) the last complete window then the partial one, otherwise the partial one; the partial
    window's rows from pos0 mod ratio on as (0, −1e30). The ring puts position p in row p mod
    (coff·ratio), so for ratio 4 window w sits in half w mod 2 and the other half holds w − 1."""
    if coff == 2:
        even = (pos0 // ratio) % 2 == 0  # the current window in the first half: the halves swap
        swap = lambda a: jnp.concatenate([a[ratio:], a[:ratio]])
        ring_kv = jnp.where(even, swap(ring_kv), ring_kv)
        ring_sc = jnp.where(even, swap(ring_sc), ring_sc)
    live = (jnp.arange(coff * ratio) < (coff - 1) * ratio + pos0 % ratio)[:, None]
    return jnp.where(live, ring_kv, 0.0), jnp.where(live, ring_sc, NEG_INF)


def projections(prefix: str) -> tuple[str, str]:
    """The weights a compressor applies to the normed input: its kv and its gate (the score)."""
    return f"{prefix}_kv", f"{prefix}_gate"


def compress_chunk(cfg: ModelConfig, layer: int, w: dict, prefix: str, proj, pos0, cache, st_kv, st_sc, rope):
    """One compressor (``prefix`` "attn_compressor" or "indexer_compressor") over a chunk.

    Returns (cache', front): the cache with every window slot of the chunk written, and what
    ``commit_frontier`` makes the frontier ring from for any number of committed tokens (decode:
    the ring with its row in place). ``proj`` (kv, gate) [T, coff·hd] each: the normed input through
    the ``projections`` weights (the caller makes them with its other matmuls of that input, one
    launch on the kernel path); (st_kv, st_sc) the ring.
    """
    indexer = prefix.startswith("indexer")
    ratio, coff = cfg.ratio(layer), cfg.coff(layer)
    hd = cfg.idx_head_dim if indexer else cfg.head_dim
    kvc, sc = proj
    T = kvc.shape[0]
    n_slots = window_slots(ratio, T)
    P = ratio if coff == 2 else 0

    pos = pos0 + jnp.arange(T, dtype=jnp.int32)
    ape = w[f"{prefix}_ape"].planes["w"].astype(F32)  # [ratio, coff*hd]
    sc = sc + ape[pos % ratio]

    def pooled():
        rem = pos0 % ratio
        L = P + n_slots * ratio
        # The window buffer: each row picked from the chunk or the frontier into a fresh buffer (writes
        # into the frontier copied it first: 84 copies a 43-layer decode step. 8 layers, H200, session
        # 25: 18 kernels and 31.7 µs of kernels a step fewer this way).
        j = jnp.arange(L, dtype=jnp.int32) - (P + rem)
        in_chunk = ((j >= 0) & (j < T))[:, None]
        pad = ((0, L - P - ratio), (0, 0))  # the frontier, then empty rows for the chunk's later windows
        front_kv, front_sc = frontier_view(st_kv, st_sc, pos0, ratio, coff)
        head_kv, head_sc = jnp.pad(front_kv, pad), jnp.pad(front_sc, pad, constant_values=NEG_INF)
        src = jnp.clip(j, 0, T - 1)  # the chunk's row each buffer row would take
        buf_kv = jnp.where(in_chunk, jnp.take(kvc, src, axis=0), head_kv)
        buf_sc = jnp.where(in_chunk, jnp.take(sc, src, axis=0), head_sc)
        return kernels.compressor_pool(
            buf_kv, buf_sc, ratio, coff, hd, n_slots, T, lambda: _pool(buf_kv, buf_sc, ratio, coff, hd, n_slots)
        )

    if T == 1:  # decode: its row into its ring slot now, in place (with the pooling, on the kernel path)

        def reference():
            here = pos0 % (coff * ratio)
            ring = tuple(lax.dynamic_update_slice(a, r, (here, 0)) for a, r in ((st_kv, kvc), (st_sc, sc)))
            return pooled(), ring

        rows, ring = kernels.compressor_pool_ring(st_kv, st_sc, kvc, sc, pos0, ratio, coff, hd, reference)
        front = {"ring": ring}
    else:
        rows, front = pooled(), {"ring": (st_kv, st_sc), "rows": (kvc, sc)}
    norm_w = w[f"{prefix}_norm"].planes["w"]

    def into_cache():
        start = pos0 - pos0 % ratio + ratio * jnp.arange(n_slots, dtype=jnp.int32)  # window start positions
        cos, sin = rope_angles(start, cfg, layer, rope)
        if indexer:
            trip = lambda r: fp4_e2m1_round_trip(kernels.hadamard(r), cfg.fp4_block)
        else:
            trip = lambda r: fp8_e4m3_head(r, cfg.n_nope, cfg.fp8_block)
        r = row_values(rows, norm_w, cos, sin, cfg.rms_eps, trip)
        # Incomplete slots are written too: they sit past n // ratio, invisible until rewritten.
        # (Decode could compute a row only on the token that completes its window, under a
        # lax.cond: 364 µs of kernels fewer a 43-layer step but 0.58 ms a token slower, the host's
        # time in the calls up 0.49 ms: XLA:GPU runs a conditional from the host. H200, session 25.)
        return lax.dynamic_update_slice(cache, r.astype(cache.dtype), (pos0 // ratio, 0))

    # One launch that writes only complete windows' rows, where taken
    trip = ("fp4", cfg.fp4_block) if indexer else ("fp8", cfg.n_nope, cfg.fp8_block)
    args = (rows, norm_w, cache, pos0, T, ratio, rope["compressed"], cfg.rms_eps, trip)
    return kernels.compressor_rows(*args, into_cache), front


def commit_frontier(cfg: ModelConfig, layer: int, front: dict, pos0, n):
    """The frontier ring after committing the chunk's first ``n`` tokens: their rows into their
    slots (a row that a later committed row overwrites is dropped); decode's row is in already."""
    if "rows" not in front:
        return front["ring"]
    return tuple(ring_commit(ring, rows, pos0, n) for ring, rows in zip(front["ring"], front["rows"], strict=True))


def visible_rows(pos: jax.Array, ratio: int) -> jax.Array:
    """Compressed rows visible to the token at ``pos``: those completed by it or earlier."""
    return (pos + 1) // ratio
