"""The one place the model asks for a kernel: Pallas on GPU, the plain-jnp reference elsewhere.

Each entry takes the same arrays either way and returns the same bits (the kernels sum the
reference's rounded products in double-float, as ``numerics.asum`` does; checked on random
data at every DeepSeek V4 Flash shape on an H100), so the choice is only about speed. It is
made at trace time from static shapes and the environment:

    DS4JAX_KERNELS=auto       on GPU, the kernels where they measured faster than XLA (default):
                              the Q8_0 kernel for the verifier's 2..4-token batches at every
                              shape and at N=1 on weights of 8 MB and more (the LM head,
                              attn_q_b, attn_output_a and _b, the shared expert's down), and
                              two matrices of one input as one launch at every N (the
                              shared expert's gate and up, attn_q_a and attn_kv); the
                              routed-expert kernels at every N, prefill chunks too (v3: 3-6x
                              XLA's gather + dot); the hyper-connection Sinkhorn (one launch for ~40 per sublayer) and,
                              at N = 1..4, its whole pre-mix (three launches for ~10), its
                              post-mix, the attention sums (two launches for ~8, and its
                              epilogue with the output's inverse rotation and quantization), the
                              indexer's scores and its top-k, a compressor's window pooling (at decode from
                              its frontier ring, the token's row written in place) and its
                              new rows into its cache, and the RMS
                              norms with their outputs' quantization (the Q_A/KV_A pair also
                              making the KV row and, at decode, writing it into the raw
                              window); the Hadamard transform; at N=1 the float-weight
                              matmuls of 4 MB and more (the normed input's five F16
                              matrices in one launch, the indexer's q_b); the shared
                              expert's SwiGLU with its quantization, from its gate+up
                              launch's partials; q's per-head norm with its tail RoPE (a
                              head a program). A prefill chunk's rows (more than 4): the dense
                              Q8_0 projections on the tensor cores (``q8_0_rows``), the routed
                              experts, and the decode kernels ``PREFILL_KERNELS`` names (their
                              grids run over the tokens); the rest on XLA.
    DS4JAX_KERNELS=all        on GPU, every kernel at N = 1..4 (and the prefill's, as ``auto``)
    DS4JAX_KERNELS=off        the reference everywhere
    DS4JAX_KERNELS=interpret  every kernel at N = 1..4, interpreted off GPU (the CPU tests)
    DS4JAX_NO_Q8_SHARE_BATCH=1  Q8_0 batches of 2..4 tokens take the reference path
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

from ds4jax.errors import DS4Error
from ds4jax.model.numerics import adot, quantize_q8_0, quantize_q8_k, rms_norm, rounded_in_loop, swiglu, with_terms
from pallas_kernels import attention as attention_kernel
from pallas_kernels import compressor_pool as compressor_pool_kernel
from pallas_kernels import compressor_row as compressor_row_kernel
from pallas_kernels import experts, float_dense, norms, q8_0, q8_0_rows, registers
from pallas_kernels import hadamard as hadamard_kernel
from pallas_kernels import hc_post as hc_post_kernel
from pallas_kernels import hc_pre as hc_pre_kernel
from pallas_kernels import indexer_scores as indexer_kernel
from pallas_kernels import indexer_top as indexer_top_kernel
from pallas_kernels import quantize as quantize_kernel
from pallas_kernels import sinkhorn as sinkhorn_kernel
from pallas_kernels.common import SplitSums, value_of

registers.install()  # registers.MAXNREG caps named kernels' registers (empty: every kernel as Triton chooses)

MAX_TOKENS = q8_0.MAX_TOKENS  # the kernels serve decode (N=1) and the verifier (N=2..4); a prefill
# chunk takes the routed experts' kernel (its programs are (token, expert) pairs, so a chunk is only
# more programs, where XLA's gather-then-dot materialises every pair's decoded expert: 64 tokens x 6
# experts x 2048x4096 at full size, ~120 GB of temporaries), ``q8_0_rows`` and ``PREFILL_KERNELS``.
REFERENCE_PAIR_ELEMENTS = 1 << 27  # above this many gathered weights, the reference goes in groups


def mode() -> str:
    m = os.environ.get("DS4JAX_KERNELS", "auto").strip().lower()
    if m not in ("auto", "all", "off", "interpret"):
        raise DS4Error(f"DS4JAX_KERNELS must be auto, all, off or interpret, not {m!r}")
    return m


# The decode kernels a prefill chunk's rows (more than MAX_TOKENS) take on a GPU too, by name
# ('+'-separated: attention, indexer, hc_pre, hc_post, norm, head_norm, indexer_q, sinkhorn, swiglu,
# pool, row; ab variants set it; empty: none). Their grids run over the tokens, so any T lowers. H200,
# session 38, 8 layers, 1,024 tokens, chunks of 64, one process each: all but ``row`` 2,850.0 against
# 2,800.9 tokens/s with the same final state and logits (call G). ``row`` was left out: the compressor
# rows' kernel wrote complete windows' rows only, where the reference also writes the incomplete
# windows' (invisible, rewritten once complete), so the state differed in rows no token reads (the
# logits did not; CPU, interpreted, tiny preset). At a prefill chunk it now writes every row as the
# reference does (``compressor_rows``), the state the reference's on the CPU; not timed, so not named.
PREFILL_KERNELS = "attention+indexer+hc_pre+hc_post+norm+head_norm+indexer_q+sinkhorn+swiglu+pool"


def _prefill(name: str) -> bool:
    return name in PREFILL_KERNELS.split("+")


def _use(n_tok: int, auto: bool, any_n: bool = False) -> tuple[bool, bool]:
    """(use the kernel, interpret it) for a batch of n_tok rows; ``auto``: whether ``auto``
    takes the kernel on GPU for this call; ``any_n``: the kernel takes any n_tok on GPU
    (interpreted, still at most MAX_TOKENS: the CPU tests' prefill stays on the reference)."""
    m = mode()
    if m == "off" or (n_tok > MAX_TOKENS and not (any_n and jax.default_backend() == "gpu")):
        return False, False
    if m == "interpret":
        return True, jax.default_backend() != "gpu"
    on_gpu = jax.default_backend() == "gpu"
    return on_gpu and (m == "all" or auto), False


# Where the activations are quantized before the Q8_0 and expert kernels: False in XLA (one
# fusion that XLA merges into the producer; the kernels read int8), True inside the kernels (one
# launch fewer, but every program quantizes the K range it reads: 2.2-4.2 µs a call more on the
# small Q8_0 shapes, H200 session 12). Same bits either way. GPU time a step, 8 full-size layers
# (H200, session 14, profiler): 2,857 µs in XLA against 2,960 µs in the kernels (-3.5 %).
QUANTIZE_IN_KERNEL = False

# Where XLA's side quantizes (QUANTIZE_IN_KERNEL False), one launch (``pallas_kernels.quantize``:
# the same functions on register tiles) instead of XLA's three fusions a projection. 8 full-size
# layers (H200, session 23, one process): 2,385.9 against 2,452.6 µs of kernels a step, 616
# against 678 kernels. Where a norm feeds the matmul, ``rms_norm_quant`` quantizes instead.
QUANT_KERNEL = True


def _quantize(x, kind: str, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """(q, d) of x [..., K] as ``numerics.quantize_q8_0`` ("q8_0") or ``quantize_q8_k`` ("q8_k"):
    the quantize kernel on GPU where QUANT_KERNEL takes it, else XLA. x may be a matmul launch's
    ``SplitSums``, which the quantize launch adds itself (else XLA finishes them first). Not
    interpreted in the whole model (its own test runs it interpreted)."""
    x2 = x if isinstance(x, SplitSums) else x.reshape(-1, x.shape[-1])
    if QUANT_KERNEL and not interpret and jax.default_backend() == "gpu" and quantize_kernel.supported(x2, kind):
        q, d = quantize_kernel.quantize(x2, kind, chunk=quantize_kernel.CHUNK, warps=quantize_kernel.WARPS)
        return q.reshape(x.shape), d.reshape(*x.shape[:-1], d.shape[-1])
    return quantize_kernel.KINDS[kind][0](value_of(x))


def _given(pre, kind: str, x: jax.Array):
    """x's quantization for ``kind`` from ``pre`` (made in its norm's launch, ``rms_norm_quant``)
    in x's leading shape, or None."""
    if pre is None or kind not in pre:
        return None
    q, d = pre[kind]
    return q.reshape(x.shape), d.reshape(*x.shape[:-1], d.shape[-1])


# The Hadamard kernel (indexer q and compressed rows) in ``auto`` (``all`` always takes it): GPU
# time a step, 8 full-size layers (H200, session 14): 2,803 µs against 2,857 without (-1.9 %).
HADAMARD_IN_AUTO = True

# At N=1 the Q8_0 kernel is taken from this many weights up (below, XLA's fused int8 dot beats
# the kernel's fixed cost: 4 MB matrices). GPU time a step, 8 full-size layers (H200, session
# 14): 2,725 µs with the grouped attn_output_a (32 MB) on the kernel against 2,857 µs on XLA,
# whose in-model fusions took 37.5 µs a layer for it (6 kernels) against the kernel's ~17 µs;
# every Q8_0 weight on the kernel (the small ones too): 2,783 µs. Session 26 (H200, one process,
# since the quantize launch and the CUDA-core dots): from 8 MB, i.e. the shared expert's down too,
# 2,173.9 against 2,181.4 µs of kernels a step at 8 layers, 8 kernels fewer.
Q8_AUTO_N1_BYTES = 8 << 20


def _q8_auto(n: int, out: int, k: int) -> bool:
    """Whether ``auto`` takes the Q8_0 kernel for n tokens on this weight (measured above)."""
    if n >= 2:
        return True
    return out * k >= Q8_AUTO_N1_BYTES


def q8_0_matmul(x, qs: jax.Array, d: jax.Array, groups: int = 1, pre=None, split: str | None = None):
    """x [..., G*K] f32 (or a launch's ``SplitSums`` of [n, G*K]), quantized per 32
    (``numerics.quantize_q8_0``), against Q8_0 planes qs [G*r, K], d [G*r, K/32] → [..., G*r].
    ``pre``: x's quantization where its norm made it (``rms_norm_quant``), or None. ``split``: the
    reader ("post": ``hc_post``; "quant": the next matmul's quantize launch) that takes the output
    as ``SplitSums`` where the launch runs (x [n, K]) and its flag is on."""
    auto = lambda n: _q8_auto(n, qs.shape[0], qs.shape[1])
    return _q8_0(x, ((qs, d),), groups, auto, pre, split is not None and _split_on(split))[0]


# Several Q8_0 matrices of one input in one launch (``q8_0_matmuls``: the shared expert's gate and
# up, attn_q_a and attn_kv), at every N: at N=1 ``auto`` takes the kernel from this many weights in
# all. H200, session 16, 8 full-size layers, GPU time a step: 2,610.9 µs and 824 kernels with both
# pairs on the kernel (0 here), 2,612.3 µs and 840 with q_a+kv on XLA (16 MB), 2,622.2 µs and 848
# with neither pair (each matrix its own XLA fusion, as before). A call at N=1: gate+up 10.7-11.9 µs
# against 13.6-13.7 on XLA (two fusions) or 2 x 7.6-7.7 as two kernel launches; q_a+kv 7.9-8.7
# against XLA's 10.5-10.6 for the two.
Q8_MANY_AUTO_N1_BYTES = 0

# Up to this many tokens the Q8_0 kernel's block dots run on CUDA cores (``dp4a``, ``TileConfig.cores``)
# instead of the tensor cores: the same sums in the same order, so the same bits, and N=1
# still equals N=2's rows. A call alone (H200, session 18, kernel time in jit): N=1 mtp_e_proj
# 11.70 -> 9.70 µs, attn_q_b 15.81 -> 13.46, attn_output_b 16.60 -> 15.58; at N=4 the CUDA cores
# lose (their work grows with N: 15.3 -> 23.6 µs on attn_q_b).
Q8_CORES_MAX_TOKENS = 1
# ... and at N=2 (the verifier) for launches of K up to this (0: none). H200, session 34 call E, a launch
# at N=2, CUDA cores (4 steps' loads together) against tensor cores: attn_q_b (K 1024) 14.33 / 15.34 µs,
# mtp_e_proj and the shared expert's gate+up, attn_q_a+attn_kv (K 4096) 10.50 / 11.04, 11.07 / 11.92,
# 7.92 / 8.65; attn_output_b (K 8192) 17.15 / 15.97. Session 35 call A: shexp_down (K 2048) 7.82 / 8.09,
# attn_output_a's grouped launch (K 4096 a group) 17.31 / 16.25: grouped launches keep the tensor cores.
# The MTP step at 43 layers (call D, one process, interleaved, the same state): 14,390 against 14,871 µs
# of kernels a verify step, 11.61 against 13.02 ms a step (median of 7 noisy rounds).
Q8_CORES_N2_MAX_K = 4096


# A launch's K-split partials left for the norms' launch that reads them (``rms_norm_quant`` with
# ``SplitSums`` parts: the Q_A/KV_A pair), instead of XLA's finish-and-slice, a kernel a matrix
# (attention.py's Q_A/KV_A outputs: 105.6 µs and 86 kernels a 43-layer step, H200 session 28 call
# D). Off: 8 full-size layers, one process (session 28 call G), 2,053.4 against 2,054.9 µs of
# kernels a step with 16 kernels fewer: the norms' launch takes what the slices cost. ``all`` (the
# GPU tests) takes it.
SPLIT_SUMS_TO_NORM = False

# attn_output_a's grouped launch leaves its K-split partials for the quantize launch of attn_output_b's
# input (``quantize.quantize`` reading ``SplitSums``), instead of XLA's finish between the two launches
# (attention.py's finish: 56.0 µs and 43 kernels a 43-layer step, H200, session 30 call B). Off: under
# CONCURRENT that finish ran beside other kernels, and 43 layers took 8.840 against 8.825 ms a token
# (H200, session 32 call A, one process). ``all`` (the GPU tests) takes it.
SPLIT_SUMS_TO_QUANT = False

# The shared expert's middle (its gate+up launch's partials added, the SwiGLU, the down projection's
# Q8_0 quantization) as one launch (``quantize.swiglu_quantize``) instead of XLA's kernels. H200,
# session 29, one process: 8 layers 2,062.7 against 2,066.4 µs of kernels a step, 8 kernels fewer;
# with ATTN_OUT_IN_AUTO at 43 layers 10,701.4 against 10,769.0 µs, 86 kernels fewer (call A); the
# always-verifying MTP step gains with the three session-29 launches (3,051.9 against 3,112.4 µs
# at 8 layers, call E), so they run at every N. ``all`` takes it.
SWIGLU_QUANT_IN_AUTO = True

# The routed experts' middle likewise (``swiglu_quant(weights=)``): the gate+up expert launch's
# partials added, the SwiGLU, the router weight, the down kernel's Q8_K quantization, in one launch
# instead of XLA's fusions. Off: it lost, H200, session 30, one process each: 43 layers 10,144.7
# against 10,110.3 µs of kernels a step with the same 2,162.8 kernels (call C; call B: 10,274.1
# against 10,241.1), 8 layers +1.2 µs; its launch takes 3.15 µs a layer (the shared expert's 2.64),
# at 2 or 1 warps a program more. ``all`` (the GPU tests) takes it.
ROUTED_SWIGLU_QUANT_IN_AUTO = False


def _split_on(reader: str) -> bool:
    """Whether a launch's outputs go unfinished to ``reader`` ("norm": ``rms_norm_quant``; "quant":
    the next Q8_0 matmul's quantize launch;
    "swiglu": ``swiglu_quant``; "routed": ``swiglu_quant(weights=)``; "post", "post_terms": ``hc_post``)."""
    flags = {
        "norm": SPLIT_SUMS_TO_NORM,
        "quant": SPLIT_SUMS_TO_QUANT and QUANT_KERNEL and not QUANTIZE_IN_KERNEL,
        "swiglu": SWIGLU_QUANT_IN_AUTO,
        "routed": ROUTED_SWIGLU_QUANT_IN_AUTO,
        "post": SPLIT_SUMS_TO_POST and HC_POST_IN_AUTO,
        "post_terms": SPLIT_TERMS_TO_POST and HC_POST_IN_AUTO and HC_POST_TERMS,
    }
    return flags[reader] or mode() == "all"


def q8_0_matmuls(x: jax.Array, mats, pre=None, split: str | None = None) -> tuple:
    """``q8_0_matmul`` of one x [..., K] against several Q8_0 weights (qs, d) of that K: x is
    quantized once and, on the kernel path, one launch computes every output (a launch has a
    fixed cost of several µs, KERNELS.md). The same bits as separate calls. ``split``: the reader
    ("norm" or "swiglu", ``_split_on``) that takes the outputs as ``SplitSums`` (the launch's
    partials, added where they are read) where the launch runs (x [n, K]) and its flag is on."""
    total = sum(qs.shape[0] * qs.shape[1] for qs, _ in mats)
    split = split is not None and x.ndim == 2 and _split_on(split)
    return _q8_0(x, tuple(mats), 1, lambda n: n >= 2 or total >= Q8_MANY_AUTO_N1_BYTES, pre, split)


def swiglu_quant(g, u, clamp: float, act_quant: bool = True, weights=None):
    """(mid, pre): mid = swiglu(g, u, clamp) for g, u [n, w] (arrays, or ``SplitSums`` from
    ``q8_0_matmuls``); ``pre`` is mid's Q8_0 quantization ({"q8_0": (q, d)}) made by one launch where
    the kernel path takes it, else None. Where ``pre`` is given, the down projection reads only it
    and XLA drops the f32 SwiGLU as dead code. Not interpreted in the whole model (its own test runs
    it so).

    ``weights`` [T, k] (the routed experts' router weights): g, u are [T, k, w] arrays, or
    ``expert_matmul``'s ``SplitSums`` of its T·k rows; mid [T, k, w] is the SwiGLU times each
    row's weight, ``pre`` its Q8_K quantization ({"q8_k": ...}) for the expert down kernel."""
    routed = weights is not None
    kind = "q8_k" if routed else "q8_0"
    mid = swiglu(value_of(g), value_of(u), clamp)
    if routed:
        mid = mid.reshape(*weights.shape, mid.shape[-1]) * weights[..., None]
    auto = ROUTED_SWIGLU_QUANT_IN_AUTO if routed else SWIGLU_QUANT_IN_AUTO
    use, interpret = _use(mid.shape[0], auto=auto, any_n=_prefill("swiglu"))
    if not act_quant or not use or interpret or QUANTIZE_IN_KERNEL:
        return mid, None
    g, u = (x if isinstance(x, SplitSums) else x.reshape(-1, x.shape[-1]) for x in (g, u))
    if not quantize_kernel.swiglu_supported(g, u, kind=kind):
        return mid, None
    wts = weights.reshape(-1) if routed else None
    warps = quantize_kernel.ROUTED_SWIGLU_WARPS if routed else quantize_kernel.SWIGLU_WARPS
    q, d = quantize_kernel.swiglu_quantize(g, u, clamp, wts, kind=kind, warps=warps)
    return mid, {kind: (q.reshape(mid.shape), d.reshape(*mid.shape[:-1], d.shape[-1]))}


# A prefill chunk's rows (more than MAX_TOKENS) against Q8_0 weights on the tensor cores
# (``q8_0_rows``) instead of the reference's integer einsum, which XLA runs as reductions. The same
# bits (``numerics.asum`` rounds once). H200, session 38: each launch 2.0-5.4x faster than XLA's
# einsum at 64 rows (call A); 8 layers, 1,024 tokens, one process, the same state and logits (call
# B): 2,735.2 against 2,177.0 tokens/s at chunks of 64, 2,599.3 against 2,103.2 at 256.
Q8_ROWS = True


def _q8_rows(n: int, mats: tuple, groups: int) -> bool:
    use, interpret = _use(n, auto=Q8_ROWS, any_n=True)  # more than MAX_TOKENS rows: on a GPU only
    return n > MAX_TOKENS and use and not interpret and all(q8_0_rows.supported(*qs.shape, groups) for qs, _ in mats)


def _q8_0(x: jax.Array, mats: tuple, groups: int, auto, pre=None, split: bool = False) -> tuple:
    """The outputs of x against each (qs, d) of ``mats``: the Q8_0 kernel, one launch for all of
    them, where ``auto(n)`` (for ``auto``) and the mode take it; else the reference, x quantized once.
    A prefill chunk's rows: ``q8_0_rows`` where ``_q8_rows`` takes it."""
    lead = x.shape[:-1]
    n = math.prod(lead)
    if _q8_rows(n, mats, groups):
        xq, dx = _given(pre, "q8_0", x) or quantize_q8_0(value_of(x))
        xq, dx = xq.reshape(n, -1), dx.reshape(n, -1)
        return tuple(q8_0_rows.matmul(xq, dx, qs, d, groups).reshape(*lead, qs.shape[0]) for qs, d in mats)
    use, interpret = _use(n, auto=auto(n))
    if n > 1 and os.environ.get("DS4JAX_NO_Q8_SHARE_BATCH", "") not in ("", "0"):
        use = False
    if not use or not all(q8_0.supported(*qs.shape, groups) for qs, _ in mats):
        xq, dx = _given(pre, "q8_0", x) or quantize_q8_0(value_of(x))
        return tuple(q8_0.reference(xq, dx, qs, d, groups) for qs, d in mats)
    x2 = x if isinstance(x, SplitSums) else x.reshape(n, -1)  # a launch's partials: the quantize launch adds them
    xq, dx = (value_of(x2), None) if QUANTIZE_IN_KERNEL else _given(pre, "q8_0", x2) or _quantize(x2, "q8_0", interpret)
    qs, d = zip(*mats)
    one = len(mats) == 1  # a single matrix may be grouped; several share one launch
    n2_cores = n == 2 and groups == 1 and qs[0].shape[-1] <= Q8_CORES_N2_MAX_K
    cores = (n <= Q8_CORES_MAX_TOKENS or n2_cores) and not QUANTIZE_IN_KERNEL
    if split and (not one or len(lead) == 1):
        sums = q8_0.matmul(
            xq, dx, qs[0] if one else qs, d[0] if one else d, groups, interpret=interpret, cores=cores, raw=True
        )
        return (sums,) if one else sums
    ys = q8_0.matmul(xq, dx, qs[0] if one else qs, d[0] if one else d, groups, interpret=interpret, cores=cores)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ((ys,) if one else ys))


# Float-weight matmuls (F16 in ds4's files: the compressors' kv and gate, the indexer's q_b and
# projection) as one launch, the matrices of one input together (``float_dense``), in ``auto`` at N=1
# (at N=2 its launches lost to XLA's: session 28, H200). Session 28, H200, one process each: with 8
# rows, BK 128 and a launch a compressor, +16.6 µs of kernels an 8-layer step (call B); with 16 rows,
# BK 256, 8 warps and the normed input's five matrices in one launch, −9.0 µs and −12 kernels (call C).
FLOAT_IN_AUTO = True
# ``auto`` takes the float launch up to this many tokens, and for launches of at least this many weight
# bytes. Session 28 call E (H200, 8 layers, one process): the router (2 MB) back on XLA −8.7 µs of
# kernels a step; the launch at N=2 in the always-verifying MTP step +12.4 µs.
FLOAT_MAX_N = 1
FLOAT_MIN_BYTES = 4 << 20


def float_matmuls(x: jax.Array, ws: tuple) -> tuple:
    """``numerics.adot`` of x [..., K] against each float weight [O_m, K] of ``ws``: on the kernel
    path one launch for all of them; the same bits."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = math.prod(lead)
    nbytes = sum(w.size * w.dtype.itemsize for w in ws)
    use, interpret = _use(n, auto=FLOAT_IN_AUTO and n <= FLOAT_MAX_N and nbytes >= FLOAT_MIN_BYTES)
    if not use or not float_dense.supported(tuple(w.shape[0] for w in ws), k):
        return tuple(adot(x, w) for w in ws)
    ys = float_dense.matmul(x.reshape(n, k), tuple(ws), interpret=interpret)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)


# The FFN input's quantization (one row a token, shared by its k experts) goes to the gate+up expert
# launch as it is, its pairs reading row p // k, instead of XLA's two copies repeating it k times a
# layer (93 µs and 86 kernels a 43-layer step, H200, session 30 call B). Session 30 call C, one process:
# 43 layers 10,110.3 against 10,180.3 µs of kernels a step, 2,162.8 against 2,248.8 kernels; 8 layers
# 1,962.6 against 1,982.1.
EXPERT_ROWS_BY_TOKEN = True


def expert_matmul(x: jax.Array, qtype: int, planes, ids: jax.Array, pre=None, split: str | None = None):
    """Routed experts: x [T, k|1, n] f32, quantized per 256 (Q8_K, ``numerics.quantize_q8_k``),
    ids [T, k] → [T, k, out]. On the kernel path the kernel quantizes x itself.

    A middle dim of 1 (the FFN input, shared by a token's experts) broadcasts over the k.
    ``planes`` may be a tuple of plane dicts of one shape (gate and up): the result is then the
    tuple of their outputs, from one kernel launch. ``pre``: x's quantization where its norm made
    it (``rms_norm_quant``, for the shared input), or None. ``split``: the reader ("routed",
    ``_split_on``; "post_terms") that takes the outputs as ``SplitSums`` of the T·k rows (the launch's
    partials, added where they are read) where the kernel runs and its flag is on."""
    many = isinstance(planes, (tuple, list))
    mats = tuple(planes) if many else (planes,)
    T, k = ids.shape
    out = mats[0]["d"].shape[1]
    use, interpret = _use(T, auto=True, any_n=True)
    if not use or not experts.supported(qtype, out):
        xq, dx = _given(pre, "q8_k", x) or quantize_q8_k(x)  # once per token where x is shared by its experts
        xq = jnp.broadcast_to(xq, (T, k, xq.shape[-1]))
        dx = jnp.broadcast_to(dx, (T, k, dx.shape[-1]))
        ys = tuple(_expert_reference(xq, dx, qtype, m, ids) for m in mats)
    else:
        # A token's input shared by its k experts stays one row: the kernel's pairs read it by index
        # (repeating it k times first cost XLA two copies a layer: 93 µs a 43-layer step, H200,
        # session 30).
        shared = EXPERT_ROWS_BY_TOKEN and x.ndim == 3 and x.shape[1] == 1
        rows = lambda a: a.reshape(T, -1) if shared else jnp.broadcast_to(a, (T, k, a.shape[-1])).reshape(T * k, -1)
        if QUANTIZE_IN_KERNEL:
            xq, dx = rows(x), None
        else:
            xq, dx = (rows(a) for a in _given(pre, "q8_k", x) or _quantize(x, "q8_k", interpret))
        # the launch chosen here, at trace time, so module knobs (experts.IQ2_NARROW, Q2K_NARROW) take effect
        cfg = experts.choose_config(qtype, out, x.shape[-1] // 256, whole=dx is not None)  # whole-K: int8 in
        if split is not None and _split_on(split):
            return experts.matmul(
                xq, dx, ids.reshape(-1), qtype, mats if many else mats[0], cfg, interpret=interpret, raw=True
            )
        ys = tuple(
            y.reshape(T, k, out) for y in experts.matmul(xq, dx, ids.reshape(-1), qtype, mats, cfg, interpret=interpret)
        )
    return ys if many else ys[0]


def _expert_reference(xq, dx, qtype: int, planes: dict, ids):
    """``experts.reference`` for [T, k] pairs, in sequential groups of tokens when the gathered
    experts would be large (a prefill chunk of a full-size model); decode batches (T <= MAX_TOKENS)
    stay loop-free. Each pair's value does not depend on the grouping."""
    T, k = ids.shape
    per_token = k * planes["d"].shape[1] * xq.shape[-1]
    g = max(1, REFERENCE_PAIR_ELEMENTS // per_token)
    if T <= MAX_TOKENS or T <= g:
        return experts.reference(xq, dx, qtype, planes, ids)
    n = -(-T // g)
    pad = lambda a: jnp.pad(a, [(0, n * g - T)] + [(0, 0)] * (a.ndim - 1)).reshape(n, g, *a.shape[1:])
    body = lambda a: experts.reference(a[0], a[1], qtype, planes, a[2], rnd=rounded_in_loop)
    ys = jax.lax.map(body, (pad(xq), pad(dx), pad(ids)))
    return ys.reshape(n * g, *ys.shape[2:])[:T]


# RMS norms in one launch with the quantization of their outputs (``norms.rms_norm_quant``):
# attn_norm, the Q_A/KV_A pair, ffn_norm and the output norms, whose outputs feed the Q8_0 and
# expert kernels. Where XLA runs the norm (a reduce and a multiply) and the quantize launch follows.
NORM_QUANT_IN_AUTO = True


# The KV row's tail RoPE, FP8 head and f16 in the Q_A/KV_A norms' launch (``kv_row``), instead of
# XLA's in-place rotation and the FP8 head's fusion a layer. 8 full-size layers, one process (H200,
# session 28): 2,071.9 against 2,085.1 µs of kernels a step, 475.8 against 480.8 kernels.
KV_ROW_IN_NORM = True

# At decode, that launch also writes the row into its slot of the raw window (in place), instead of
# XLA's in-place update a layer (attention.py's ring write: 89.2 µs and 43 kernels a 43-layer step,
# H200 session 27). Session 28, H200, 8 layers, one process each: −0.7 µs and −7 kernels a step
# (call B), −5.3 µs and −7 kernels (call C). With FLOAT_IN_AUTO, 43 layers (call C): 10,747.6 against
# 10,842.9 µs of kernels a step, 2,478.8 against 2,603.8 kernels, 10.481 against 10.538 ms a token.
RAW_RING_IN_NORM = True


def rms_norm_quant(parts, eps: float, kv_row=None):
    """parts ((x [T, n] or ``SplitSums``, w [n], kinds), ...) → per part (rms_norm(x, w), pre): ``pre`` holds x's
    quantization for each of ``kinds`` ("q8_0", "q8_k") as (q, d), for ``q8_0_matmul(s)`` and
    ``expert_matmul`` to take as theirs, or is None (those functions then quantize it
    themselves: the same bits). Not interpreted in the whole model (its own test runs it so).
    ``kv_row`` (cos, sin, n_nope, block, values, ring): the last part's first item is instead
    ``values(its normed rows)`` (the KV rows as the raw window stores them) or, with ``ring`` (raw
    [W, n], slot; one token), the raw window with that row in row ``slot``. Made in the launch where
    ``KV_ROW_IN_NORM`` (and ``RAW_RING_IN_NORM`` for the ring) or under ``DS4JAX_KERNELS=all``."""
    T = parts[0][0].shape[0]
    use, interpret = _use(T, auto=NORM_QUANT_IN_AUTO, any_n=_prefill("norm"))
    k = norms  # the launch knobs read here, at trace time (ab_decode.py variants set them)
    row_in = ring_in = False  # whether the launch makes the KV row, and writes it into the window
    if not use or interpret or QUANTIZE_IN_KERNEL or not k.quant_supported(parts, k.CHUNKS):
        parts = tuple((value_of(x), w, kk) for x, w, kk in parts)
        out = tuple((rms_norm(x, w, eps), None) for x, w, _ in parts)
    else:
        if kv_row is not None:
            cos, _, n_nope, block, _, ring = kv_row
            every = mode() == "all"  # ``all``: every kernel (the GPU tests)
            kv = (n_nope, block, cos.shape[-1])
            row_in = (KV_ROW_IN_NORM or every) and k.quant_supported(parts, k.CHUNKS, kv)
            ring_in = row_in and ring is not None and (RAW_RING_IN_NORM or every)
            ring_in = ring_in and k.quant_supported(parts, k.CHUNKS, kv, ring)
        out = k.rms_norm_quant(
            parts,
            eps,
            chunks=k.CHUNKS,
            warps=k.WARPS,
            kv_row=kv_row[:4] if row_in else None,
            ring=kv_row[5] if ring_in else None,
        )
    if kv_row is None or ring_in:
        return out
    (rows, pre), values, ring = out[-1], kv_row[4], kv_row[5]
    if not row_in:
        rows = values(rows)
    if ring is not None:
        rows = jax.lax.dynamic_update_slice(ring[0], rows, (ring[1], 0))
    return (*out[:-1], (rows, pre))


# The per-head norm and tail RoPE kernel in ``auto``. At 16 heads a program (4 programs a token) it
# lost to XLA's fusions (run 6; session 23: 2,353.1 against 2,298.7 µs of kernels an 8-layer step;
# session 27: +47.6 µs); at one head a program (``norms.HEADS_A_PROGRAM``) it wins: 8 full-size
# layers, H200, session 29 (call G), 1,975.0 against 1,999.5 µs, 4 kernels fewer; exact on that GPU
# against the reference at 1, 2, 4 and 16 heads a program, T = 1 and 2.
HEAD_NORM_IN_AUTO = True


def head_norm_rope(q: jax.Array, cos: jax.Array, sin: jax.Array, eps: float) -> jax.Array:
    """Per-head weightless RMS norm of q [T, H, hd], then the tail RoPE (cos/sin [T, n_rot/2])."""
    use, interpret = _use(q.shape[0], auto=HEAD_NORM_IN_AUTO, any_n=_prefill("head_norm"))
    if not use or not norms.head_supported(q, cos):
        return norms.head_norm_rope_reference(q, cos, sin, eps)
    return norms.head_norm_rope(q, cos, sin, eps, heads_per_program=norms.HEADS_A_PROGRAM, interpret=interpret)


def hadamard(x: jax.Array) -> jax.Array:
    """The scaled Walsh–Hadamard transform of x [..., n] over its last axis (the indexer's q and
    compressed rows). Its rows are independent, so any number of them takes the kernel.
    In ``auto`` since session 14 (``HADAMARD_IN_AUTO``: −54 µs of GPU time a step over 8
    full-size layers, H200); exact on the H200 (session 12)."""
    use, interpret = _use(1, auto=HADAMARD_IN_AUTO)
    if not use or not hadamard_kernel.supported(x.shape[-1]):
        return hadamard_kernel.reference(x)
    return hadamard_kernel.hadamard(x, interpret=interpret)


# The indexer's query chain (tail RoPE, Hadamard, FP4 round trip) as one launch
# (``hadamard.rope_hadamard_fp4``; its rows a program: ``hadamard.ROPE_BLOCK_ROWS``) instead of the
# Hadamard's launch between XLA's fusions: −331.6 µs and −105 kernels a 43-layer step (H200,
# session 29, call D).
INDEXER_Q_IN_AUTO = True


def indexer_q(q: jax.Array, cos: jax.Array, sin: jax.Array, block: int, reference):
    """The indexer's queries q [T, H, n] tail-rotated by cos/sin [T, P], Hadamard-transformed and
    FP4 round-tripped per ``block``: one launch where it is taken, else ``reference()``."""
    use, interpret = _use(q.shape[0], auto=INDEXER_Q_IN_AUTO and HADAMARD_IN_AUTO, any_n=_prefill("indexer_q"))
    if not use or not hadamard_kernel.rope_supported(q, cos, block):
        return reference()
    return hadamard_kernel.rope_hadamard_fp4(q, cos, sin, block, hadamard_kernel.ROPE_BLOCK_ROWS, interpret=interpret)


# On XLA:CPU the reference runs as its own jitted function: traced once per shape instead of at
# each of the 2 call sites a layer (its 40 unrolled exact divisions were ~40 % of tracing a decode
# program), and XLA:CPU compiles the called computation once: the tiny model's decode takes 22.4 s
# instead of 27.6 s to its first logits, with the same bits (the CPU tests compile dozens of such
# programs). Pure jnp, no dispatch decision inside, so the jit cache is safe. Not timed on a GPU,
# so the GPU keeps the inline form.
_sinkhorn_cpu = jax.jit(sinkhorn_kernel.reference, static_argnums=(1, 2))


def sinkhorn(c: jax.Array, n_iter: int, hc_eps: float) -> jax.Array:
    """The hyper-connection Sinkhorn of c [..., n, n]: one launch instead of dozens of fusions."""
    use, interpret = _use(math.prod(c.shape[:-2]), auto=True, any_n=_prefill("sinkhorn"))
    # Interpreted, its 40 unrolled normalisations take ~20 s to compile per call site, too slow
    # for the whole-model CPU test; its own test checks it against the reference.
    if not use or interpret or not sinkhorn_kernel.supported(c.shape[-1]):
        xla = _sinkhorn_cpu if jax.default_backend() == "cpu" else sinkhorn_kernel.reference
        return xla(c, n_iter, hc_eps)
    return sinkhorn_kernel.sinkhorn(c, n_iter, hc_eps, sums=sinkhorn_kernel.SUMS)  # read at trace time


# The hyper-connection pre-mix kernels (``hc_pre``: the mixer, the gates, the Sinkhorn) in ``auto``.
# GPU time a step, 8 full-size layers (H200, session 20, one process): 2,523 µs and 712 kernels
# against 2,563 µs and 823 kernels with XLA's pre-mix (2.429 against 2.454 ms a token).
HC_PRE_IN_AUTO = True


def hc_pre(H: jax.Array, fn, scale, base, n_iter: int, rms_eps: float, hc_eps: float, reference, squares=None):
    """The hyper-connection pre-mix of H [T, n, d]: (x, post, comb) from the fused kernel
    (``fn``: the mixer's float plane, None for another type), else ``reference()``.
    ``squares``: Σ H² a token as ``hc_post`` below returns it, or None."""
    use, interpret = _use(H.shape[0], auto=HC_PRE_IN_AUTO, any_n=_prefill("hc_pre"))
    # Interpreted, its unrolled Sinkhorn compiles for ~20 s a call site (as ``sinkhorn`` above):
    # the whole-model CPU tests keep the reference; the kernel's own test checks it.
    if not use or interpret or fn is None or not hc_pre_kernel.supported(H, fn):
        return reference()
    k = hc_pre_kernel  # its launch knobs read here, at trace time (ab_decode.py variants set them)
    splits = k.splits_for(H.shape[1] * H.shape[2], given=squares is not None)  # SPLITS or SPLITS_GIVEN
    knobs = {"warps": k.WARPS, "stages": k.STAGES, "sums": sinkhorn_kernel.SUMS, "sq_chunk": k.SQ_CHUNK}
    return k.hc_pre(H, fn, scale, base, n_iter, rms_eps, hc_eps, squares, splits, **knobs)


# The hyper-connection post-mix as one kernel (``hc_post``) that also sums the new state's squares
# for the next pre-mix's RMS scale (its mixer then skips its own pass over the token's squares).
# H200, session 22: 8 full-size layers, one process, 2,462.4 against 2,500.5 µs of kernels a step
# (call C, at 128 columns a program); a post-mix then a pre-mix alone 15.0 against 19.8 µs at N=1,
# 15.5 against 20.1 at N=2.
HC_POST_IN_AUTO = True


# The FFN's output summed inside the post-mix's launch (``terms``: the routed experts' outputs beside
# the shared expert's, instead of XLA's sum over the experts and the add). 8 full-size layers, one
# process (H200, session 24): 2,248.4 against 2,258.2 µs of kernels a step.
HC_POST_TERMS = True

# The sublayers' outputs go to the post-mix's launch as their matmul launches' K-split partials
# (``SplitSums``: attn_output_b's and the shared expert's down, "post"; the routed experts' down,
# "post_terms"), which it adds per column slice as ``finish`` does, instead of XLA's finish fusion
# for each (attention.py's and moe.py's: 175 µs and 129 kernels a 43-layer step, H200, session 30
# call B). H200, session 30, one process each: all three lost at 43 layers (call D: 10,124.9 against
# 10,108.3 µs of kernels a step, 2,033.8 against 2,162.8 kernels; the always-verifying MTP step at 8
# layers +7.8 µs): the six routed terms' partials (96 loads a program) cost the post-mix's launch
# more than their finish fusion. Without them (call E): 9,987.9 against 10,096.7 µs, 2,076.8 against
# 2,162.8 kernels, 9.749 against 9.846 ms a token; the MTP step at 8 layers 2,995.4 against 3,015.2
# µs (call F). So "post" is on at every N, "post_terms" off. ``all`` (the GPU tests) takes both.
SPLIT_SUMS_TO_POST = True
SPLIT_TERMS_TO_POST = False


def hc_post(H: jax.Array, y: jax.Array, post: jax.Array, comb: jax.Array, reference, terms=None):
    """(H', squares): the post-mix from the kernel with Σ H'² a token as double-float pairs for
    ``hc_pre``, else (``reference()``, None). ``terms`` [T, k, d] or None: the sublayer's output
    is Σ_k terms + y (``reference`` sums them itself). y and terms may come as their launches'
    ``SplitSums`` (terms: of the T·k rows), which the kernel adds itself. Not interpreted in the whole model, as
    ``hc_pre`` (which alone reads the squares); its own test runs it interpreted."""
    T = H.shape[0]
    use, interpret = _use(T, auto=HC_POST_IN_AUTO, any_n=_prefill("hc_post"))
    if not use or interpret or not hc_post_kernel.supported(H):
        return reference(), None
    k = hc_post_kernel  # launch knobs read at trace time (ab_decode.py variants set them)
    if terms is not None and not HC_POST_TERMS:
        y, terms = with_terms(value_of(y), term_rows(terms, T)), None
    return k.hc_post(H, y, post, comb, terms, cols=k.COLS, warps=k.WARPS)


def term_rows(terms, T: int) -> jax.Array | None:
    """The routed experts' outputs [T, k, d] from an array or ``expert_matmul``'s ``SplitSums`` of its
    T·k rows (finished by XLA); None stays None."""
    if terms is None:
        return None
    v = value_of(terms)
    return v.reshape(T, -1, v.shape[-1])


# The decode attention kernels (``attention.sink_attention``: scores, then the mix by key splits,
# with XLA's max and epilogue) in ``auto`` at N = 1..4. H200, session 21, 8 full-size layers, one
# process: 2,524.2 against 2,538.8 µs of kernels a step, 29 kernels fewer (call G). Session 22, a
# launch pair alone against XLA's path (ratio-4 keys / ratio-128 keys, µs): N=1 35.7 / 23.0
# against 45.6 / 22.0; N=2 60.4 / 31.4 against 76.1 / 34.8; N=4 111.1 / 53.5 against 133.7 / 58.2.
ATTN_IN_AUTO = True

# The indexer's scores (per head ReLU(q·k), then the heads' weighted sum) as one launch and XLA's
# epilogue, at N = 1..4. 8 full-size layers (3 with the indexer), one process (H200, session 24):
# 2,225.9 against 2,250.6 µs of kernels a step with XLA's reductions (11.5 µs a layer for the dots).
INDEXER_IN_AUTO = True


def indexer_scores(q: jax.Array, weights: jax.Array, table: jax.Array, n_visible: jax.Array, reference):
    """The indexer's scores [T, R] of q [T, H, hd] with the heads' weights [T, H] over the f16 rows
    table [R, hd], the rows from ``n_visible`` [T] on left for the caller to mask: the kernel where
    it is taken (it skips those rows' blocks), else ``reference()``. Interpreted it compiles in
    seconds, so the whole-model CPU tests run it."""
    use, interpret = _use(q.shape[0], auto=INDEXER_IN_AUTO, any_n=_prefill("indexer"))
    if not use or not indexer_kernel.supported(q, table):
        return reference()
    return indexer_kernel.scores(q, weights, table, n_visible, interpret=interpret)


# The indexer's top-k at N = 1..4 from ranks over each token's visible rows (one launch), instead of
# XLA's rank fusion (tables up to RANK_TOP_K_MAX comparisons) or its sort of the whole table, which
# a long context's allocated rows make large whatever the filled context is. H200, session 48, 43
# layers, 2,048 tokens filled, one process: a 32,768-token context 8.966 -> 7.922 ms a token
# (11,787 -> 10,792 µs of kernels a step, 5 kernels fewer a ratio-4 layer); a 4,096-token one
# 7.808 -> 7.743 (10,720 -> 10,677 µs); the same end states.
INDEXER_TOP_IN_AUTO = True


def indexer_top(scores: jax.Array, n_visible: jax.Array, k: int, reference):
    """The k best rows [T, k] of the indexer's scores [T, n], the rows from ``n_visible`` [T] on
    counted as −inf (``indexer.top_indices`` of the masked scores): the kernel where it is taken,
    else ``reference()``. Interpreted it compiles in seconds, so the whole-model CPU tests run it."""
    use, interpret = _use(scores.shape[0], auto=INDEXER_TOP_IN_AUTO)
    if not use or not indexer_top_kernel.supported(scores, k):
        return reference()
    return indexer_top_kernel.top(scores, n_visible, k, interpret=interpret)


# A compressor's window pooling (the max, exp and the two sums over each window) as one launch
# instead of XLA's ~4 fusions a compressor, at N = 1..4. H200, session 25: a launch 1.55-3.21 µs
# against XLA's 4.06-8.34 at N=1; 8 full-size layers, one process, 2,206.4 against 2,233.1 µs of
# kernels a step and 2.119 against 2.144 ms a token in ``generate``'s loop.
COMPRESSOR_POOL_IN_AUTO = True


def compressor_pool(
    buf_kv: jax.Array, buf_sc: jax.Array, ratio: int, coff: int, hd: int, n_slots: int, n_tok: int, reference
):
    """The pooled rows [n_slots, hd] of a compressor's window-aligned buffers for a chunk of
    ``n_tok`` tokens: the kernel where it is taken, else ``reference()``. Interpreted it compiles
    in seconds, so the whole-model CPU tests run it."""
    use, interpret = _use(n_tok, auto=COMPRESSOR_POOL_IN_AUTO, any_n=_prefill("pool"))
    if not use or not compressor_pool_kernel.supported(ratio, coff, hd):
        return reference()
    return compressor_pool_kernel.pool(buf_kv, buf_sc, ratio, coff, hd, n_slots, interpret=interpret)


# Decode's pooling read from the frontier ring, the token's row written into it in the same launch:
# no window buffer (XLA's select) and no row written by XLA. H200, session 27, one process against
# XLA's decode on the same ring: 2,078.4 against 2,098.8 µs of kernels an 8-layer step (480.8 against
# 499.8 kernels), 10,900.1 against 11,011.8 µs at 43 layers (2,642.8 against 2,751.8 kernels).
POOL_RING_IN_AUTO = True


def compressor_pool_ring(ring_kv, ring_sc, kv, sc, pos0, ratio: int, coff: int, hd: int, reference):
    """(pooled [1, hd], (ring_kv', ring_sc')) of a decode token (``compressor_pool.pool_ring``): the
    kernel where it is taken, else ``reference()``."""
    use, interpret = _use(1, auto=POOL_RING_IN_AUTO)
    if not use or not compressor_pool_kernel.supported(ratio, coff, hd):
        return reference()
    return compressor_pool_kernel.pool_ring(ring_kv, ring_sc, kv, sc, pos0, ratio, coff, hd, interpret=interpret)


# A compressor's new rows (norm, tail RoPE, the FP8 head or the indexer's Hadamard and FP4, f16)
# written into its cache by one launch whose programs return at once on incomplete windows, instead
# of ~5 XLA kernels on every token. The attention compressors': 8 full-size layers (H200, session
# 27, one process): 2,124.4 against 2,143.1 µs of kernels a step, 2.036 against 2.053 ms a token;
# the indexer's too, 43 layers: 10,941.4 against 11,136.9 µs, 10.550 against 10.712 ms.
COMPRESSOR_ROW_IN_AUTO = True
INDEXER_ROW_IN_AUTO = True


def compressor_rows(rows, w, cache, pos0, n_tok: int, ratio: int, tables: dict, eps: float, trip: tuple, reference):
    """The cache after a compressor's chunk of ``n_tok`` tokens: the pooled rows [S, hd] normed
    (weight w), rotated (``tables``: the compressed layers' RoPE tables), through ``trip``
    (``compressor_row.supported``), as f16 at row pos0 // ratio on: the kernel (complete windows'
    rows only; the others stay invisible) where it is taken, else ``reference()`` (every row)."""
    auto = INDEXER_ROW_IN_AUTO if trip[0] == "fp4" else COMPRESSOR_ROW_IN_AUTO
    use, interpret = _use(n_tok, auto=auto, any_n=_prefill("row"))
    if not use or not compressor_row_kernel.supported(rows.shape[-1], tables["cos"].shape[-1], trip):
        return reference()
    args = (rows, w, tables["cos"], tables["sin"], cache, pos0)
    every = n_tok > MAX_TOKENS  # a prefill chunk: every row, as the reference (its state, bit for bit)
    return compressor_row_kernel.rows_into_cache(*args, n_tok, ratio, eps, trip, interpret=interpret, every=every)


# The attention's epilogue, the tail's inverse rotation and the output projection's quantization as
# one launch (``attention.sink_attention(quant_rotated=)``), where the attention kernels run. H200,
# session 29 (call A), 8 layers: 2,049.0 against 2,066.4 µs of kernels a step, 8 kernels fewer.
ATTN_OUT_IN_AUTO = True


def sink_attention(q: jax.Array, parts, sink: jax.Array, scale, reference, out_angles=None):
    """(o, pre): the attention sums o [T, H, hd] of q over ``parts`` ((f16 table, rows or None,
    visible), ...) with the sink: the kernels where they are taken, else ``reference()``.
    ``out_angles`` (cos, sin [T, n_rot/2]): ``pre`` is then the Q8_0 quantization ({"q8_0": (q, d)},
    [T, H·hd]) of o with its tail inverse-rotated by those angles (the output projection's input),
    made by the attention's epilogue launch where it runs, else None. Interpreted, these kernels
    compile in seconds, so the whole-model CPU tests run them."""
    use, interpret = _use(q.shape[0], auto=ATTN_IN_AUTO, any_n=_prefill("attention"))
    if not use or not attention_kernel.supported(q, parts):
        return reference(), None
    knobs = {"split": attention_kernel.SPLIT, "prefetch": attention_kernel.PREFETCH}  # at trace time: ab variants
    quant = out_angles is not None and _use(q.shape[0], auto=ATTN_OUT_IN_AUTO, any_n=_prefill("attention"))[0]
    quant = quant and not QUANTIZE_IN_KERNEL
    quant = quant and attention_kernel.out_supported(q, out_angles[0])
    res = attention_kernel.sink_attention(
        q, tuple(parts), sink, float(scale), interpret=interpret, quant_rotated=out_angles if quant else None, **knobs
    )
    if not quant:
        return res, None
    o, (qq, dq) = res
    return o, {"q8_0": (qq.reshape(q.shape[0], -1), dq.reshape(q.shape[0], -1))}
