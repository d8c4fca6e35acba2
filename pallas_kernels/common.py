"""Pieces every kernel shares: the double-float accumulator and the FMA barrier.

The model's plain-jnp path sums block products with ``numerics.asum`` (``dd_add`` in a
variadic reduce), which gives the correctly rounded sum almost always, whatever the
order. The kernels accumulate the same rounded products with the same TwoSum, in a
fixed order per output; so a row's value is the same at N=1..4 tokens (same order),
and equal to the jnp path's (same correctly rounded sum). That is what lets a GPU
decode step use a kernel while prefill uses XLA, and still agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as pltriton

from ds4jax.model.numerics import dd_add

F32 = jnp.float32


def opaque(x: jax.Array, zero: jax.Array) -> jax.Array:
    """x, with its f32 rounding forced: XOR with a zero loaded at run time.

    Triton (and XLA in interpret mode) contract ``a*b + c`` into an FMA; the product
    must be rounded before it enters the TwoSum, exactly as the jnp path rounds it."""
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) ^ zero, F32)


def two_sum_add(s: jax.Array, e: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s, e) += p with Knuth's TwoSum: s + e tracks the exact sum to ~2^-48."""
    t = s + p
    bp = t - s
    err = (s - (t - bp)) + (p - bp)
    return t, e + err


def finish(s: jax.Array, e: jax.Array, splits=None) -> jax.Array:
    """Combine partial double-float sums [P, ...] in order p = 0, 1, ... (or the partials
    ``splits``, in their order) and round once. Takes arrays, or a kernel's refs (each p a load).

    An unrolled chain of elementwise ops, not a reduce: XLA may pick a different tree
    for a reduce at another batch shape, while an elementwise chain is the same
    arithmetic for every element whatever N is."""
    acc = None
    for p in range(s.shape[0]) if splits is None else splits:
        acc = (s[p], e[p]) if acc is None else dd_add(acc, (s[p], e[p]))
    return acc[0] + acc[1]


def finished(parts):
    """A launch's outputs rounded once: its K-split (s, e) partials [S, ...] added in split order
    (``finish``), or its one array [1, ...] of rows already finished (no split). Takes arrays, or
    a kernel's refs (each split a load: Triton cannot slice a loaded tile)."""
    return parts[0][0] if len(parts) == 1 else finish(*parts)


def matrix_columns(outs: tuple) -> tuple:
    """(start, width) of each matrix's columns in the output of a launch over matrices of ``outs``
    rows (several matrices of one input, one launch)."""
    return tuple((sum(outs[:m]), o) for m, o in enumerate(outs))


def by_row_tile(run, tiles: tuple, i):
    """Several matrices in one launch: ``run(m, tile)`` for the matrix m whose row tiles
    [first, first + tiles[m]) hold the program's row tile i (a uniform branch a program)."""

    def run_from(m, first):
        if m == len(tiles) - 1:
            return run(m, i - first)
        end = first + tiles[m]
        return jax.lax.cond(i < end, lambda: run(m, i - first), lambda: run_from(m + 1, end))

    return run_from(0, 0)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["arrays"], meta_fields=["start", "width", "n"])
@dataclasses.dataclass(frozen=True)
class SplitSums:
    """A matmul's output columns [start, start + width) of its first n tokens, still as the launch's
    outputs (``finished`` makes the rows): K-split (s, e) pairs [S, N', out] or one array [1, N',
    out]. A kernel that reads the output adds the pairs itself (``finished`` on its refs: the same
    elementwise chain, so the same bits), where XLA would add them and slice the columns out as a
    kernel of their own."""

    arrays: tuple
    start: int
    width: int
    n: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.width)

    @property
    def ndim(self) -> int:
        return 2

    def value(self) -> jax.Array:
        """The finished [n, width] rows (XLA)."""
        return finished(self.arrays)[: self.n, self.start : self.start + self.width]


def value_of(x) -> jax.Array:
    """x's rows: a ``SplitSums``' finished value (XLA), or x itself."""
    return x.value() if isinstance(x, SplitSums) else x


def as_split_sums(x, rows: int | None = None) -> SplitSums:
    """x as ``SplitSums``: a launch's outputs as they are, or a finished array as the one-array form
    of its ``rows`` rows (default: its leading dim; [T, k, d] terms as their T·k rows)."""
    if isinstance(x, SplitSums):
        return x
    x = x.reshape(rows or x.shape[0], x.shape[-1])
    return SplitSums((x[None],), 0, x.shape[1], x.shape[0])


def runtime_zero(x: jax.Array) -> jax.Array:
    """A [1] int32 zero made from data, that the compiler cannot see is zero (feeds ``opaque``).

    Compiled for a GPU, the kernel loads it from memory, which nothing can fold. Interpreted
    (the CPU tests) the kernel body is XLA ops, and a zero computed next to its use gets
    folded: XLA folds a barrier around a constant and decides comparisons like ``|x| < 0``;
    once XLA fuses a cheap computation into the consumer, LLVM knows that clz(v) ≤ 32 or
    that a ^ a = 0. So: clz(v) >> 6 (zero, but HLO does not reason about clz's range),
    materialized behind a barrier so that no consumer fusion sees how it was made."""
    v = lax.bitcast_convert_type(x.reshape(-1)[:1].astype(F32), jnp.int32)
    return lax.optimization_barrier(lax.shift_right_logical(lax.clz(v), jnp.int32(6)))


def kernel_zero(x: jax.Array, interpret: bool) -> jax.Array:
    """The [1] int32 zero a kernel feeds ``opaque``.

    Compiled for a GPU, a constant operand is a buffer the kernel loads at run time: Triton
    cannot fold it, and it costs no launch (``runtime_zero`` is two small XLA kernels per
    call: 1.5 µs, run 9 in speed-bench/KERNELS.md). Interpreted, the kernel body is XLA ops
    that would fold a constant, so the zero is computed from data."""
    return runtime_zero(x) if interpret else jnp.zeros((1,), jnp.int32)


def dp4a(a: jax.Array, b: jax.Array, c: jax.Array, interpret: bool) -> jax.Array:
    """c + Σ_k a_k b_k over the four signed bytes k of int32 words a and b (PTX ``dp4a``): one
    instruction for four int8 products and their sum, exact. Interpreted, the same in jnp."""
    a, b, c = jnp.broadcast_arrays(a, b, c)
    if interpret:
        byte = lambda w, k: lax.shift_right_arithmetic(lax.shift_left(w, jnp.int32(24 - 8 * k)), jnp.int32(24))
        return c + sum(byte(a, k) * byte(b, k) for k in range(4))
    return pltriton.elementwise_inline_asm(
        "dp4a.s32.s32 $0, $1, $2, $3;",
        args=[a, b, c],
        constraints="=r,r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)],
    )[0]


def iq2_sign_masks(s7: jax.Array, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """IQ2_XXS signs of 8 elements from their 7-bit field s7 (int32; the 8th sign is the parity
    of the 7) as two words of 0x00/0xFF bytes: elements 0-3 and 4-7 (0xFF: negative).

    On the GPU, PTX: popc for the parity, then per nibble a multiply that moves bit i to the
    top of byte i (4-bit copies at bits 7, 14, 21, 28: no carries) and a ``prmt`` that spreads
    each byte's top bit over the byte (selector 0xBA98). Interpreted, the same in jnp."""
    if interpret:
        sb = s7 | ((lax.population_count(s7) & 1) << 7)
        spread = lambda b: ((b * 0x204081) & 0x01010101) * 255
        return spread(sb & 15), spread(sb >> 4)
    sb = _asm("{ .reg .b32 p; popc.b32 p, $1; and.b32 p, p, 1; shl.b32 p, p, 7; or.b32 $0, $1, p; }", s7)
    spread = "mul.lo.u32 v, v, 0x10204080; prmt.b32 $0, v, 0, 0xBA98; }"
    return (
        _asm("{ .reg .b32 v; and.b32 v, $1, 15; " + spread, sb),
        _asm("{ .reg .b32 v; shr.u32 v, $1, 4; " + spread, sb),
    )


def nib_bytes(sel: jax.Array, table: tuple[int, int], interpret: bool) -> jax.Array:
    """A word of 4 bytes picked from the 8-byte ``table`` (two little-endian u32 words: bytes
    0-3, 4-7) by the 4 low nibbles of ``sel`` (int32; byte i by nibble i, whose bit 3 must be
    0): PTX ``prmt`` in default mode, one instruction. Interpreted, the same in jnp, bit 3
    included (prmt then gives the picked byte's sign bit spread over the byte), so a test on
    the CPU catches a selector whose bit 3 leaks."""
    if interpret:  # scalar constants only: a kernel may not capture arrays
        tab = [int(v) for v in np.frombuffer(np.asarray(table, "<u4").tobytes(), np.uint8)]
        out = jnp.zeros_like(sel)
        for i in range(4):
            nib = (sel >> (4 * i)) & 15
            k = nib & 7
            byte = sum(jnp.where(k == j, jnp.int32(t), jnp.int32(0)) for j, t in enumerate(tab))
            byte = jnp.where(nib >= 8, jnp.where(byte >= 128, jnp.int32(255), jnp.int32(0)), byte)
            out = out | (byte << (8 * i))
        return out
    a, b = table
    return _asm(f"{{ .reg .b32 ta, tb; mov.b32 ta, {a:#x}; mov.b32 tb, {b:#x}; prmt.b32 $0, ta, tb, $1; }}", sel)


def _asm(code: str, a: jax.Array) -> jax.Array:
    """One int32 → int32 PTX block per element (one result: the lowering takes no more)."""
    return pltriton.elementwise_inline_asm(
        code, args=[a], constraints="=r,r", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)]
    )[0]


def byte_words(q: jax.Array) -> jax.Array:
    """[..., 4m] bytes → [..., m] int32 little-endian words (disjoint bits: a shifted sum)."""
    q = q.reshape(*q.shape[:-1], q.shape[-1] // 4, 4).astype(jnp.int32)
    return jnp.sum(q << (lax.broadcasted_iota(jnp.int32, (1,) * (q.ndim - 1) + (4,), q.ndim - 1) * 8), axis=-1)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Launch shape of one matmul kernel: rows per program, K splits, blocks per loop step,
    warps and software-pipelining stages.

    Only ``blocks_per_step`` and ``k_splits`` decide the summation order (so the bits);
    rows, warps and stages are free to tune per N without changing a result.
    """

    block_rows: int = 64
    k_splits: int = 1
    blocks_per_step: int = 4
    num_warps: int = 4
    num_stages: int = 3
    # Q8_0 only: the block dots on CUDA cores (``dp4a`` on packed words, no tensor-core dot)
    # instead of the block-diagonal int8 dot. Same order of the sums, so the same bits.
    cores: bool = False
    # Q8_0's CUDA-core form: loop steps whose loads are issued together before their dots (the same
    # chains in the same order, so the same bits; only time).
    unroll: int = 1


def is_pow2(n: int) -> bool:
    """n a power of two (>= 1): a Triton tile dimension."""
    return n >= 1 and n & (n - 1) == 0


def pow2_at_least(n: int, lo: int = 1) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


# ---- helpers for register tiles (Triton cannot slice them) -------------------------------------
def pick(a: jax.Array, axis: int, i: int) -> jax.Array:
    """a[..., i, ...] along ``axis`` as a masked sum (Triton cannot slice a register tile): exact."""
    axis %= a.ndim
    idx = lax.broadcasted_iota(jnp.int32, tuple(n if d == axis else 1 for d, n in enumerate(a.shape)), axis)
    return jnp.sum(jnp.where(idx == i, a, jnp.zeros_like(a)), axis=axis)


def _lower_variadic_reduce():
    """Let kernels call ``lax.reduce`` with their own combine (a double-float sum: ``numerics.dd_sum``).

    Pallas' Triton lowering has sum, max, min and arg reductions, each a ``tt.reduce`` (warp
    shuffles, then shared memory across warps), but not the generic ``lax.reduce``, although
    ``tt.reduce`` takes several operands and any combine region. Registered here with the lowering
    Pallas uses for argmax. Without it a double-float sum across lanes was a tree of masked picks:
    a layout conversion through shared memory and a barrier a level (session 20)."""
    from jax._src.pallas.triton import lowering as tl

    if lax.reduce_p in tl.triton_lowering_rules:
        return

    def rule(ctx, *args, computation, jaxpr, dimensions):
        del computation
        if len(dimensions) != 1 or jaxpr.consts:
            raise NotImplementedError("a kernel's lax.reduce: one axis, a combine without constants")
        n = len(args) // 2  # operands, then their initial values (unused: the axis is not empty)
        body = lambda left, right: jax.core.eval_jaxpr(jaxpr.jaxpr, [], *left, *right)
        operands = tuple(args[:n])
        return tl._reduction_lowering(body, ctx.replace(avals_in=ctx.avals_in[:n]), operands, dimensions)

    tl.triton_lowering_rules[lax.reduce_p] = rule


_lower_variadic_reduce()
