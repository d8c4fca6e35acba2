"""The indexer's top-k of decode and the verifier from ranks over the visible rows alone
(``ds4jax.model.indexer.top_indices`` of the masked scores), instead of XLA's sort of the whole
table: a 32,768-token context allocates 8,209 compressed rows a ratio-4 layer, and the sort reads
them all whatever the filled context is, where a rank needs only the rows a token sees.

Programs (token, ``ROWS`` table rows). Each row's rank is the count of the rows that come before it
in ``lax.top_k``'s order: a greater score in float total order (+0 above −0), or an equal one at a
lower index. Ranks are a permutation of 0..n−1, so the row of rank r < k is written to slot r and no
two programs write one slot. The visible rows (index < the token's count) are compared in a loop of
``COLS`` columns whose trip count is that count, not the table's rows. The rows past it score −inf
in the masked order, so their contribution is closed-form: a visible row's rank gains all of them
only where its own score is below −inf (a negative NaN); a row past the count ranks after every
visible score ≥ −inf and the hidden rows before it. Rows past the count by k or more rank ≥ k, so
their programs write nothing.

H200, session 48, alone (``speed-bench/indexer_top.py``, k = 512): 3.4 µs at 512 visible rows
(XLA's sort of a 32,768-token context's 8,209 rows 54.1 µs, its rank fusion of 1,041 rows 5.2 µs),
7.3 µs at 2,048, 24.5 µs at 8,192 (the sort 58.9); at two tokens 46.5 against 60.8 at 8,192.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import total_order_key
from pallas_kernels.common import F32

__all__ = ["supported", "top"]

ROWS = 32  # table rows (ranks) a program
COLS = 128  # visible rows compared a loop step
WARPS = 4  # 8 warps or 64 columns a step gained nothing that held at two tokens (H200, session 48)
I32 = jnp.int32
# A masked scatter store: ``triton.store`` in newer jax, ``pallas.store`` before it.
_store = getattr(plgpu, "store", None) or pl.store
# The key of −inf (bits 0xFF800000) in the integer order below.
NEG_INF_KEY = -0x7F800001


def supported(scores: jax.Array, k: int) -> bool:
    """scores [T, n] (any n: a table holds context / ratio rows plus a window's) and 0 < k ≤ n."""
    return scores.ndim == 2 and 0 < k <= scores.shape[1]


def _kernel(nv_ref, s_ref, o_ref, *, n, k, rows, cols):
    t, blk = pl.program_id(0), pl.program_id(1)
    nv = nv_ref[t]
    row0 = blk * rows

    # Rows from nv + k on rank ≥ k: nothing of theirs is written.
    @pl.when(row0 < nv + k)
    def _():
        i = row0 + lax.broadcasted_iota(I32, (rows,), 0)  # the last block's rows past n: no store
        seen = i < nv
        ki = jnp.where(seen, total_order_key(s_ref[t * n + jnp.minimum(i, n - 1)]), I32(NEG_INF_KEY))
        jj = lax.broadcasted_iota(I32, (1, cols), 1)

        def step(c, count):
            j = c * cols + jj  # [1, cols]
            kj = total_order_key(s_ref[t * n + jnp.minimum(j, n - 1)])
            beats = ((kj > ki[:, None]) | ((kj == ki[:, None]) & (j < i[:, None]))) & (j < nv)
            return count + beats.astype(I32)

        # The counts kept as a [rows, cols] tile and summed once after the loop: a reduction across
        # the lanes every step took 62.7 against 24.5 µs at 8,192 visible rows (H200, session 48).
        count = lax.fori_loop(0, (nv + cols - 1) // cols, step, jnp.zeros((rows, cols), I32))
        count = jnp.sum(count, axis=1)
        # The hidden rows (−inf, indices nv..n−1) that come before row i: all of them below a
        # visible negative NaN; for a hidden row, those at lower indices (a tie at −inf).
        hidden = jnp.where(seen, jnp.where(ki < NEG_INF_KEY, n - nv, 0), i - nv)
        rank = count + hidden
        # A row past slot k aims at a spare slot of its own (the lanes after the k), so no two
        # lanes of a store share an address (the interpreted store reads, selects and writes back).
        keep = (rank < k) & (i < n)
        slot = jnp.where(keep, rank, k + lax.broadcasted_iota(I32, (rows,), 0))
        _store(o_ref.at[t * (k + rows) + slot], i, mask=keep)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "warps", "cols"))
def top(scores, n_visible, k: int, interpret: bool = False, warps: int = WARPS, cols: int = COLS):
    """scores [T, n] f32, n_visible [T] → indices [T, k] int32: ``lax.top_k`` of the scores with
    the rows from each token's count on replaced by −inf (descending in float total order, ties to
    the lower index), read from the visible rows only. ``warps``, ``cols`` only time."""
    T, n = scores.shape
    rows, cols = min(ROWS, pl.next_power_of_2(n)), min(cols, pl.next_power_of_2(n))
    out = pl.pallas_call(
        functools.partial(_kernel, n=n, k=k, rows=rows, cols=cols),
        grid=(T, pl.cdiv(n, rows)),
        in_specs=[
            pl.BlockSpec((T,), lambda *_: (0,)),
            pl.BlockSpec((T * n,), lambda *_: (0,)),  # flat: rows are gathered by offset
        ],
        # Flat: every program of a token writes into its row's k slots (a permutation: each once).
        out_specs=pl.BlockSpec((T * (k + rows),), lambda *_: (0,)),
        out_shape=jax.ShapeDtypeStruct((T * (k + rows),), I32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="indexer_top",
    )(n_visible.astype(I32), scores.astype(F32).reshape(-1))
    return out.reshape(T, k + rows)[:, :k]
