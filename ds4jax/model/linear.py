"""Matmuls on quant planes, with ds4's CPU activation quantization.

* Q8_0 weights: the activation is quantized to int8 per 32 (``quantize_q8_0``); each
  32-block dot is an exact int32 sum, scaled by ``d_w * d_x`` and summed over blocks.
* Routed experts (IQ2_XXS / Q2_K / Q4_K): the activation is Q8_K (per 256); the
  weight-format integer dot per sub-block is exact, then scaled per super-block.
* F16 / F32 weights: plain float32 products (no TF32/bf16 passes), accurately summed.

Exact integer block dots plus accurately rounded float sums (``numerics.asum``) make a
row's result independent of how many rows are batched, which is what lets prefill,
chunked prefill, decode and the N=2 verifier agree bit for bit. This is the plain-jnp
path; the Pallas kernels will replace the hot matmuls behind these same functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ds4jax.model.numerics import F32, adot, asum, quantize_q8_0, quantize_q8_k, rounded
from ds4jax.quant import QTensor, dequantize
from ds4jax.quant.formats import QType
from ds4jax.quant.tables import IQ2XXS_GRID

I32 = jnp.int32


def dense(x: jax.Array, w: QTensor, act_quant: bool = True) -> jax.Array:
    """y[..., o] = Σ_i W[o, i] x[..., i] for a 2-D weight of any supported type.

    ``act_quant=False`` keeps Q8_0 activations in f32 (the weights stay quantized)."""
    q = QType(w.qtype)
    if q == QType.Q8_0:
        return q8_0_matmul(x, w) if act_quant else adot(x, dequantize(w))
    if q in (QType.F16, QType.F32, QType.BF16):
        return adot(x, w.planes["w"])
    raise NotImplementedError(f"dense matmul for {q.name}")


def q8_0_matmul(x: jax.Array, w: QTensor) -> jax.Array:
    out, n = w.shape
    nb = n // 32
    xq, dx = quantize_q8_0(x)
    isum = jnp.einsum(
        "...bk,obk->...ob",
        xq.reshape(*x.shape[:-1], nb, 32),
        w.planes["qs"].reshape(out, nb, 32),
        preferred_element_type=I32,
    )
    scale = w.planes["d"].astype(F32) * dx[..., None, :]  # [..., out, nb]
    return asum(rounded(isum.astype(F32) * scale))


def q8_0_grouped_matmul(x: jax.Array, w: QTensor, groups: int, act_quant: bool = True) -> jax.Array:
    """Block-diagonal Q8_0 matmul: x [..., G, k] with W [G*r, k]; group g uses rows g*r..g*r+r-1."""
    out, n = w.shape
    r, nb = out // groups, n // 32
    if not act_quant:
        wd = dequantize(w).reshape(groups, r, n)
        return asum(rounded(x[..., :, None, :] * wd), -1)
    xq, dx = quantize_q8_0(x)  # per-32 blocks never straddle a group
    isum = jnp.einsum(
        "...gbk,gobk->...gob",
        xq.reshape(*x.shape[:-1], nb, 32),
        w.planes["qs"].reshape(groups, r, nb, 32),
        preferred_element_type=I32,
    )
    scale = w.planes["d"].astype(F32).reshape(groups, r, nb) * dx[..., None, :]
    return asum(rounded(isum.astype(F32) * scale))  # [..., G, r]


# ---- routed experts with Q8_K activations -----------------------------------------
def _int_weights(w: QTensor):
    """Integer view of K/IQ planes: (q int8 [.., nb, S, L], per-sub-block scale, per-sub-block min).

    S sub-blocks of L elements per 256-block; ``min`` is None for IQ2_XXS. Planes keep
    the leading dims of ``w`` (e.g. [T, k, out]).
    """
    p = w.planes
    q = QType(w.qtype)
    if q == QType.Q2_K:
        qs = p["qs"]
        lead = qs.shape[:-1]
        shift = jnp.array([0, 2, 4, 6], jnp.uint8).reshape(4, 1)
        vals = ((qs.reshape(lead + (2, 1, 32)) >> shift) & 3).reshape(lead + (16, 16))
        return vals.astype(jnp.int8), (p["sc"] & 15).astype(I32), (p["sc"] >> 4).astype(I32)
    if q == QType.Q4_K:
        qs = p["qs"]
        lead = qs.shape[:-1]
        shift = jnp.array([0, 4], jnp.uint8).reshape(2, 1)
        vals = ((qs.reshape(lead + (4, 1, 32)) >> shift) & 15).reshape(lead + (8, 32))
        return vals.astype(jnp.int8), p["sc"].astype(I32), p["m"].astype(I32)
    if q == QType.IQ2_XXS:
        aux = p["aux"]  # [.., nb, 8] u32
        lead = aux.shape[:-1]
        ls = (aux >> 28).astype(I32)
        s7 = (aux[..., None] >> jnp.array([0, 7, 14, 21], jnp.uint32)) & 127  # [.., nb, 8, 4]
        sbyte = s7 | ((lax.population_count(s7) & 1) << 7)  # 8th sign bit = parity
        neg = ((sbyte[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1) != 0  # [.., nb, 8, 4, 8]
        mag = jnp.asarray(IQ2XXS_GRID.astype("int8"))[p["grid"].astype(I32)]  # [.., nb, 32, 8]
        mag = mag.reshape(lead + (8, 4, 8))
        vals = jnp.where(neg, -mag, mag).reshape(lead + (8, 32))
        return vals, 2 * ls + 1, None
    raise NotImplementedError(f"expert matmul for {q.name}")


def expert_linear(x: jax.Array, w: QTensor, act_quant: bool = True) -> jax.Array:
    """Σ_i W[..., o, i] x[..., i] for gathered routed experts (x Q8_K-quantized if act_quant)."""
    if not act_quant:
        return asum(rounded(x[..., None, :] * dequantize(w)), -1)
    xq, dx = quantize_q8_k(x)
    return expert_matmul(xq, dx, w)


def expert_matmul(xq: jax.Array, dx: jax.Array, w: QTensor) -> jax.Array:
    """Σ_i W[..., o, i] x[..., i] with x given as Q8_K (xq int8 [..., n], dx [..., n/256]).

    ``w`` has shape [..., out, n] with the same leading dims as x (after broadcasting),
    e.g. the gathered experts [T, k, out, n] against x [T, k, n].
    """
    vals, sc, mn = _int_weights(w)  # vals [..., out, nb, S, L]
    S, L = vals.shape[-2:]
    nb = vals.shape[-3]
    xb = xq.reshape(*xq.shape[:-1], nb, S, L)
    # Exact integer sub-block dots: [..., out, nb, S]
    sub = jnp.einsum("...bsl,...obsl->...obs", xb, vals, preferred_element_type=I32)
    isum = jnp.sum(sub * sc, axis=-1)  # [..., out, nb]
    d = w.planes["d"].astype(F32)  # [..., out, nb]
    dxb = dx[..., None, :]  # [..., 1, nb]
    if mn is None:  # IQ2_XXS: w = d * (2 ls + 1) / 8 * grid * sign
        blk = (d * dxb) * F32(0.125) * isum.astype(F32)
    else:  # K-quants: w = d * sc * q - dmin * m; the min term uses the activation block sums
        bsum = jnp.sum(xb.astype(I32), axis=-1)  # [..., nb, S]
        msum = jnp.sum(bsum[..., None, :, :] * mn, axis=-1)  # [..., out, nb]
        dmin = w.planes["dmin"].astype(F32)
        blk = rounded((d * dxb) * isum.astype(F32)) - rounded((dmin * dxb) * msum.astype(F32))
    return asum(rounded(blk))
