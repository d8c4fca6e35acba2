"""The hyper-connection post-mix of decode and the verifier (``ds4jax.model.hc.hc_post``) as one
launch that also sums the new state's squares for the next pre-mix.

Programs (token, column slice): new[j, c] = post_j·y[c] + Σ_a comb[a, j]·H[a, c] for the slice's
columns of every stream (the reference's rounded products, its correctly rounded sum over the
streams, then one f32 add), written out, and the slice's double-float sum of new² per stream (as
``numerics.sum_squares``: three exact split products). The next ``hc_pre`` kernel combines these
pairs for its RMS scale instead of each of its programs summing the token's 64 KB of squares
again (its serial squares loop was most of its work: session 20's mixer was latency-bound on it).
XLA's path is two fusions a call (a reduce over the streams, then the add).

After the FFN, y may come as its parts (``terms``): the routed experts' outputs [T, k, d] and the
shared expert's [T, d], y = Σ_k terms + shared as ``numerics.with_terms`` sums them (a double-float
sum over the k experts rounded once, then one f32 add). Each program sums its columns' k terms
itself, so XLA's two fusions for that sum and add (4.5 µs a layer at N=1, session 24's profile)
are gone.

y and the terms may also come as their matmul launches' K-split partials (``SplitSums``), which
each program adds for its columns as ``finish`` does (the same elementwise chain, so the same bits),
instead of XLA's finish fusion for each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ds4jax.model.numerics import dd_sum
from pallas_kernels.common import F32, SplitSums, as_split_sums, finished, is_pow2, kernel_zero, opaque, two_sum_add
from pallas_kernels.norms import add_squares

__all__ = ["hc_post", "supported"]

# Columns a program (64 programs a token at full size, d = 4096) and warps. H200, session 22, the
# post-mix then the pre-mix at N=1: 14.97 µs (post kernel 1.26) against 15.33 at 128 columns
# (1.62-1.68), 15.34 at 64 columns and 2 warps, 16.08 at 256, 16.74 at 512; XLA's post-mix then
# the mixer summing its own squares 19.81 µs (mixer 7.13 -> 3.47 µs).
COLS = 64
WARPS = 4


def supported(H: jax.Array) -> bool:
    """H [T, n, d] with n and d powers of two and d at least COLS."""
    if H.ndim != 3:
        return False
    _, n, d = H.shape
    return n >= 2 and is_pow2(n) and is_pow2(d) and d >= COLS


def _post_kernel(z_ref, h_ref, p_ref, c_ref, *refs, n, forms, n_terms):
    f_y, f_t = forms  # arrays a part: 1 (finished rows) or 2 (K-split partials)
    y_refs, refs = refs[:f_y], refs[f_y:]
    t_refs, (o_ref, ss_ref, se_ref) = refs[: f_t * n_terms], refs[f_t * n_terms :]
    rnd = functools.partial(opaque, zero=z_ref[0])
    cols = h_ref.shape[-1]
    y = finished(y_refs).reshape(cols)  # each ref a [S, 1, cols] block: its splits added in order
    if n_terms:  # y = Σ_k terms + y: the k terms in order as a double-float, rounded once, then the add
        s = e = jnp.zeros_like(y)
        for i in range(n_terms):
            s, e = two_sum_add(s, e, finished(t_refs[i * f_t : (i + 1) * f_t]).reshape(cols))
        y = (s + e) + y
    z = jnp.zeros((n, y.shape[0]), F32)
    acc = (z, z)
    for a in range(n):  # Σ_a comb[a, j]·H[a, c]: each product rounded, then the TwoSum (no FMA)
        acc = two_sum_add(*acc, rnd(c_ref[0, a, :][:, None] * h_ref[0, a, :][None, :]))
    new = rnd(p_ref[0, :][:, None] * y[None, :]) + (acc[0] + acc[1])  # [n, cols]
    o_ref[0] = new
    s, e = dd_sum(*add_squares(z, z, new), axis=1)  # [n]: a stream's squares over the slice
    ss_ref[0, 0, :] = s
    se_ref[0, 0, :] = e


def _parts(x, rows: int) -> SplitSums:
    """x as ``SplitSums`` of ``rows`` rows starting at column 0 (``as_split_sums``; arrays as f32)."""
    s = as_split_sums(x if isinstance(x, SplitSums) else x.astype(F32), rows)
    if s.start or s.n != rows:
        raise ValueError(f"hc_post: partials of {s.n} rows from column {s.start}, not {rows} from 0")
    return s


@functools.partial(jax.jit, static_argnames=("cols", "warps", "interpret"))
def hc_post(H, y, post, comb, terms=None, cols: int = COLS, warps: int = WARPS, interpret: bool = False):
    """H [T, n, d], y [T, d], post [T, n], comb [T, n, n] (f32) → (H' [T, n, d] as
    ``ds4jax.model.hc.hc_post``, squares: ([T, S, n], [T, S, n]) double-float pairs whose total is
    Σ H'² a token, for ``hc_pre``'s ``squares``). ``terms`` [T, k, d] or None: the sublayer's output
    is then Σ_k terms + y (``ds4jax.model.numerics.with_terms``). y may be a launch's ``SplitSums``
    ([T, d]), terms one of the T·k rows (pair t·k + i: token t's expert i). ``cols``, ``warps``: the
    launch (they only time)."""
    T, n, d = H.shape
    cols = min(cols, d)
    S = d // cols
    H, post, comb = (a.astype(F32) for a in (H, post, comb))
    ys = _parts(y, T)
    k = 0 if terms is None else (terms.n // T if isinstance(terms, SplitSums) else terms.shape[1])
    ts = None if terms is None else _parts(terms, T * k)

    def part_specs(p: SplitSums, row):
        """Each array of ``p`` as [S', 1, cols] blocks at row ``row(t)``."""
        S_ = p.arrays[0].shape[0]
        return [pl.BlockSpec((S_, 1, cols), lambda t, c: (0, row(t), c)) for _ in p.arrays]

    # one operand set per term, each [cols] of row t·k + i: k (6) is no power of two, so a [k, cols]
    # block would need padding, which Triton cannot take and XLA would copy for
    term_specs = [s for i in range(k) for s in part_specs(ts, lambda t, i=i: t * k + i)]
    pair = jax.ShapeDtypeStruct((T, S, n), F32)
    pair_spec = pl.BlockSpec((1, 1, n), lambda t, c: (t, c, 0))
    forms = (len(ys.arrays), 0 if ts is None else len(ts.arrays))
    new, ss, se = pl.pallas_call(
        functools.partial(_post_kernel, n=n, forms=forms, n_terms=k),
        grid=(T, S),
        in_specs=[
            pl.BlockSpec((1,), lambda *_: (0,)),
            pl.BlockSpec((1, n, cols), lambda t, c: (t, 0, c)),
            pl.BlockSpec((1, n), lambda t, c: (t, 0)),
            pl.BlockSpec((1, n, n), lambda t, c: (t, 0, 0)),
            *part_specs(ys, lambda t: t),
            *term_specs,
        ],
        out_specs=[pl.BlockSpec((1, n, cols), lambda t, c: (t, 0, c)), pair_spec, pair_spec],
        out_shape=[jax.ShapeDtypeStruct((T, n, d), F32), pair, pair],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="hc_post",
    )(kernel_zero(H, interpret), H, post, comb, *ys.arrays, *(() if ts is None else ts.arrays * k))
    return new, (ss, se)
