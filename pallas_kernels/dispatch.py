"""The one place the model asks for a kernel: Pallas on GPU, the plain-jnp reference elsewhere.

Each entry takes the same arrays either way and returns the same bits (the kernels sum the
reference's rounded products in double-float, as ``numerics.asum`` does; checked on random
data at every DeepSeek V4 Flash shape on an H100), so the choice is only about speed. It is
made at trace time from static shapes and the environment:

    DS4JAX_KERNELS=auto       on GPU, the kernels where they measured faster than XLA (default):
                              the Q8_0 kernel for the verifier's 2..4-token batches at every
                              shape and at N=1 on weights of 64 MB and more (the LM head) or of
                              16 MB and more without a K split (attn_q_b); the
                              routed-expert kernels at every N (v3: 3-6x XLA's gather + dot);
                              the hyper-connection Sinkhorn (one launch for ~40 per sublayer).
                              The fused norms lost to XLA's fusions and stay off.
    DS4JAX_KERNELS=all        on GPU, every kernel at N = 1..4
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
from ds4jax.model.numerics import quantize_q8_0, quantize_q8_k
from pallas_kernels import experts, norms, q8_0
from pallas_kernels import sinkhorn as sinkhorn_kernel

MAX_TOKENS = q8_0.MAX_TOKENS  # the kernels serve decode (N=1) and the verifier (N=2..4); prefill uses XLA


def mode() -> str:
    m = os.environ.get("DS4JAX_KERNELS", "auto").strip().lower()
    if m not in ("auto", "all", "off", "interpret"):
        raise DS4Error(f"DS4JAX_KERNELS must be auto, all, off or interpret, not {m!r}")
    return m


def _use(n_tok: int, auto: bool) -> tuple[bool, bool]:
    """(use the kernel, interpret it) for a batch of n_tok rows; ``auto``: whether ``auto``
    takes the kernel on GPU for this call."""
    m = mode()
    if m == "off" or n_tok > MAX_TOKENS:
        return False, False
    if m == "interpret":
        return True, jax.default_backend() != "gpu"
    on_gpu = jax.default_backend() == "gpu"
    return on_gpu and (m == "all" or auto), False


Q8_AUTO_N1_BYTES = 64 << 20  # at N=1 the kernel wins from here (the LM head: 159 vs 173 µs)
# ... and from here when the kernel needs no K split (no epilogue): attn_q_b, 36 MB, 15.6 vs
# 18.1 µs at N=1; with a split XLA's one fused kernel is as fast at N=1 (KERNELS.md, run 14)
Q8_AUTO_N1_NO_SPLIT_BYTES = 16 << 20


def _q8_auto(n: int, out: int, k: int, groups: int) -> bool:
    """Whether ``auto`` takes the Q8_0 kernel for n tokens on this weight (measured, run 14)."""
    if n >= 2:
        return True
    size = out * k
    return size >= Q8_AUTO_N1_BYTES or (
        size >= Q8_AUTO_N1_NO_SPLIT_BYTES and q8_0.choose_config(out, k, groups).k_splits == 1
    )


def q8_0_matmul(x: jax.Array, qs: jax.Array, d: jax.Array, groups: int = 1) -> jax.Array:
    """x [..., G*K] f32, quantized per 32 (``numerics.quantize_q8_0``), against Q8_0 planes
    qs [G*r, K], d [G*r, K/32] → [..., G*r]. On the kernel path the kernel quantizes x itself:
    one launch instead of a quantization kernel and the matmul."""
    lead = x.shape[:-1]
    n = math.prod(lead)
    use, interpret = _use(n, auto=_q8_auto(n, qs.shape[0], qs.shape[1], groups))
    if n > 1 and os.environ.get("DS4JAX_NO_Q8_SHARE_BATCH", "") not in ("", "0"):
        use = False
    if not use or not q8_0.supported(qs.shape[0], qs.shape[1], groups):
        return q8_0.reference(*quantize_q8_0(x), qs, d, groups)
    y = q8_0.matmul(x.reshape(n, -1), None, qs, d, groups=groups, interpret=interpret)
    return y.reshape(*lead, qs.shape[0])


def expert_matmul(x: jax.Array, qtype: int, planes, ids: jax.Array):
    """Routed experts: x [T, k|1, n] f32, quantized per 256 (Q8_K, ``numerics.quantize_q8_k``),
    ids [T, k] → [T, k, out]. On the kernel path the kernel quantizes x itself.

    A middle dim of 1 (the FFN input, shared by a token's experts) broadcasts over the k.
    ``planes`` may be a tuple of plane dicts of one shape (gate and up): the result is then the
    tuple of their outputs, from one kernel launch."""
    many = isinstance(planes, (tuple, list))
    mats = tuple(planes) if many else (planes,)
    T, k = ids.shape
    out = mats[0]["d"].shape[1]
    use, interpret = _use(T, auto=True)
    if not use or not experts.supported(qtype, out):
        xq, dx = quantize_q8_k(x)  # once per token where x is shared by its experts
        xq = jnp.broadcast_to(xq, (T, k, xq.shape[-1]))
        dx = jnp.broadcast_to(dx, (T, k, dx.shape[-1]))
        ys = tuple(experts.reference(xq, dx, qtype, m, ids) for m in mats)
    else:
        x = jnp.broadcast_to(x, (T, k, x.shape[-1])).reshape(T * k, -1)
        ys = tuple(
            y.reshape(T, k, out) for y in experts.matmul(x, None, ids.reshape(-1), qtype, mats, interpret=interpret)
        )
    return ys if many else ys[0]


def rms_norm_pair(a: jax.Array, wa: jax.Array, b: jax.Array, wb: jax.Array, eps: float):
    """(rms_norm(a, wa), rms_norm(b, wb)) for a [T, n1], b [T, n2]: one launch for both."""
    use, interpret = _use(a.shape[0], auto=False)
    if not use or not norms.pair_supported(a, b):
        return norms.rms_norm_pair_reference(a, wa, b, wb, eps)
    return tuple(norms.rms_norm_pair(a, wa, b, wb, eps, interpret=interpret))


def head_norm_rope(q: jax.Array, cos: jax.Array, sin: jax.Array, eps: float) -> jax.Array:
    """Per-head weightless RMS norm of q [T, H, hd], then the tail RoPE (cos/sin [T, n_rot/2])."""
    use, interpret = _use(q.shape[0], auto=False)
    if not use or not norms.head_supported(q, cos):
        return norms.head_norm_rope_reference(q, cos, sin, eps)
    return norms.head_norm_rope(q, cos, sin, eps, interpret=interpret)


def sinkhorn(c: jax.Array, n_iter: int, hc_eps: float) -> jax.Array:
    """The hyper-connection Sinkhorn of c [..., n, n]: one launch instead of dozens of fusions."""
    use, interpret = _use(math.prod(c.shape[:-2]), auto=True)
    # Interpreted, its 40 unrolled normalisations take ~20 s to compile per call site, too slow
    # for the whole-model CPU test; its own test checks it against the reference.
    if not use or interpret or not sinkhorn_kernel.supported(c.shape[-1]):
        return sinkhorn_kernel.reference(c, n_iter, hc_eps)
    return sinkhorn_kernel.sinkhorn(c, n_iter, hc_eps)
