"""Matmuls on quant planes, with ds4's CPU activation quantization.

* Q8_0 weights: the activation is quantized to int8 per 32 (``quantize_q8_0``); each
  32-block dot is an exact int32 sum, scaled by ``d_w * d_x`` and summed over blocks.
* Routed experts (IQ2_XXS / Q2_K / Q4_K): the activation is Q8_K (per 256); the
  weight-format integer dot per sub-block is exact, then scaled per super-block.
* F16 / F32 weights: plain float32 products (no TF32/bf16 passes), accurately summed.

Exact integer block dots plus accurately rounded float sums (``numerics.asum``) make a
row's result independent of how many rows are batched, which is what lets prefill,
chunked prefill, decode and the N=2 verifier agree bit for bit. This is the plain-jnp
path's arithmetic; ``pallas_kernels.dispatch`` runs the Pallas kernels instead on GPU (1..4
tokens: decode and the verifier; a prefill chunk's rows: the dense Q8_0 and the routed experts'
kernels), bit for bit the same.
"""

from __future__ import annotations

import jax

from ds4jax.model.numerics import adot, asum, rounded
from ds4jax.quant import QTensor, dequantize
from ds4jax.quant.formats import QType
from ds4jax.quant.jnp_decode import take
from pallas_kernels import dispatch as kernels

FLOAT_TYPES = (QType.F16, QType.F32, QType.BF16)  # weights multiplied as f32 products, not quantized


def dense(x: jax.Array, w: QTensor, act_quant: bool = True, pre=None, split: str | None = None) -> jax.Array:
    """y[..., o] = Σ_i W[o, i] x[..., i] for a 2-D weight of any supported type.

    ``act_quant=False`` keeps Q8_0 activations in f32 (the weights stay quantized). ``pre``:
    x's quantization made with its norm (``dispatch.rms_norm_quant``), or None. ``split`` ("post":
    for ``hc.hc_post_carry``): a Q8_0 output may come as the launch's ``SplitSums``."""
    q = QType(w.qtype)
    if q == QType.Q8_0:
        return q8_0_matmul(x, w, pre, split) if act_quant else adot(x, dequantize(w))
    if q in FLOAT_TYPES:
        return kernels.float_matmuls(x, (w.planes["w"],))[0]
    raise NotImplementedError(f"dense matmul for {q.name}")


def dense_many(
    x: jax.Array, ws: tuple[QTensor, ...], act_quant: bool = True, pre=None, split: str | None = None
) -> tuple:
    """``dense`` of one x against several weights: Q8_0 weights of one K share one quantization
    of x and, on the kernel path, one launch (``dispatch.q8_0_matmuls``); float weights of one K
    one launch too (``dispatch.float_matmuls``); the same bits. ``split`` ("norm": for
    ``rms_norms``; "swiglu": for ``dispatch.swiglu_quant``): Q8_0 outputs may come as the launch's
    unfinished partials (``dispatch.q8_0_matmuls``), for that reader only."""
    k = x.shape[-1]
    if act_quant and all(QType(w.qtype) == QType.Q8_0 and w.shape[-1] == k for w in ws):
        return kernels.q8_0_matmuls(x, tuple((w.planes["qs"], w.planes["d"]) for w in ws), pre, split)
    if all(QType(w.qtype) in FLOAT_TYPES and w.shape[-1] == k for w in ws):
        return kernels.float_matmuls(x, tuple(w.planes["w"] for w in ws))
    return tuple(dense(x, w, act_quant, pre) for w in ws)


def rms_norms(parts, eps: float, act_quant: bool = True, kv_row=None) -> tuple:
    """(rms_norm(x, w), pre) for each (x [T, n], w [n], kinds) of ``parts``, in one launch on the
    kernel path (``dispatch.rms_norm_quant``): ``pre`` is then the normed x's quantization for each
    of ``kinds`` ("q8_0", "q8_k") made in that launch, else None, for ``dense``, ``dense_many``
    and ``expert_linears`` to take (without it they quantize x themselves: the same bits).
    ``kv_row``: the last part's rows go on to the raw window's form (``dispatch.rms_norm_quant``)."""
    parts = tuple((x, w, tuple(k) if act_quant else ()) for x, w, k in parts)
    return kernels.rms_norm_quant(parts, eps, kv_row)


def q8_0_matmul(x: jax.Array, w: QTensor, pre=None, split: str | None = None) -> jax.Array:
    return kernels.q8_0_matmul(x, w.planes["qs"], w.planes["d"], pre=pre, split=split)  # quantizes x per 32 first


def q8_0_grouped_matmul(
    x: jax.Array, w: QTensor, groups: int, act_quant: bool = True, pre=None, split: str | None = None
) -> jax.Array:
    """Block-diagonal Q8_0 matmul: x [..., G, k] with W [G*r, k]; group g uses rows g*r..g*r+r-1
    → [..., G, r]. ``pre``: x's quantization ([..., G·k]) where a launch before made it, or None.
    ``split`` ("quant": for the next Q8_0 matmul): the output flat, [..., G·r], for that matmul to
    read, and on the kernel path possibly the launch's ``SplitSums`` (``dispatch.q8_0_matmul``)."""
    out, n = w.shape
    r = out // groups
    lead = x.shape[:-2]  # the per-32 quantization blocks never straddle a group
    if not act_quant:
        wd = dequantize(w).reshape(groups, r, n)
        y = asum(rounded(x[..., :, None, :] * wd), -1)
        return y if split is None else y.reshape(*lead, out)
    y = kernels.q8_0_matmul(x.reshape(*lead, groups * n), w.planes["qs"], w.planes["d"], groups, pre, split)
    return y if split is not None else y.reshape(*lead, groups, r)


# ---- routed experts with Q8_K activations -----------------------------------------
def expert_linear(
    x: jax.Array, w: QTensor, ids: jax.Array, act_quant: bool = True, pre=None, split: str | None = None
) -> jax.Array:
    """Σ_i W[ids, o, i] x[..., i] for the routed experts ``ids`` [T, k] of all experts ``w``.

    x is [T, k, n], or [T, 1, n] for an input shared by a token's k experts (quantized once).
    With ``act_quant`` x is Q8_K-quantized (or ``pre`` holds its quantization, made by the launch
    before); only the selected experts' weights are read. ``split``: as ``expert_linears``."""
    return expert_linears(x, (w,), ids, act_quant, pre, split)[0]


def expert_linears(
    x: jax.Array, ws: tuple[QTensor, ...], ids: jax.Array, act_quant: bool = True, pre=None, split: str | None = None
) -> tuple:
    """``expert_linear`` of one x against several expert tensors (gate and up): tensors of one
    type and shape share one kernel launch (and one quantization of x, or ``pre``: the one its
    norm made). ``split`` ("routed": for ``dispatch.swiglu_quant(weights=)``; "post_terms": for
    ``hc.hc_post_carry``): the outputs may come as the launch's unfinished ``SplitSums`` of the T·k
    rows (``dispatch.expert_matmul``)."""
    if not act_quant:
        return tuple(asum(rounded(x[..., None, :] * dequantize(take(w, ids))), -1) for w in ws)
    if len({(w.qtype, w.shape) for w in ws}) == 1:  # x is quantized per 256 (Q8_K) in there
        return kernels.expert_matmul(x, ws[0].qtype, tuple(w.planes for w in ws), ids, pre, split)
    return tuple(kernels.expert_matmul(x, w.qtype, w.planes, ids, pre) for w in ws)
