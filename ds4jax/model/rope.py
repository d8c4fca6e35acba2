"""Tail RoPE with per-layer base and YaRN (MODEL.md §4.6).

Only the last ``n_rot`` dims of a head rotate, in adjacent pairs (2k, 2k+1); the
angles come from tables built once per context size (``rope_tables``).
Raw-window layers (ratio 0) use ``rope.freq_base`` unscaled; compressed layers
use ``attention.compress_rope_freq_base`` with YaRN (factor, beta fast/slow,
original context) and no magnitude change. Per-pair angles are advanced by
repeated float32 multiplication from the position, as ds4's CPU path (and
ggml) do: ``theta_{k+1} = theta_k * base^(-2/n_rot)``. Power-based angles drift
~1e-3 rad from these by position 500.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ds4jax.config import ModelConfig
from ds4jax.model.numerics import rounded


def _yarn_corr_dim(n_rot: int, orig_ctx: int, beta: float, base: float) -> float:
    return n_rot * math.log(orig_ctx / (beta * 2 * math.pi)) / (2 * math.log(base))


def _theta_scale(base: float, n_rot: int) -> np.float32:
    """base^(-2/n_rot) correctly rounded to f32 (glibc's powf is; numpy's f32 power is not)."""
    return np.float32(float(np.float32(base)) ** (-2.0 / n_rot))


def layer_rope_params(cfg: ModelConfig, layer: int):
    """(theta_scale f32, freq_scale, ramp[n_pairs] or None) for the layer."""
    n_pairs = cfg.n_rot // 2
    if cfg.ratio(layer) == 0:
        base = cfg.rope_freq_base
        return _theta_scale(base, cfg.n_rot), 1.0, None
    base = cfg.compress_rope_freq_base
    lo = max(0.0, math.floor(_yarn_corr_dim(cfg.n_rot, cfg.rope_orig_ctx, cfg.yarn_beta_fast, base)))
    hi = min(cfg.n_rot - 1.0, math.ceil(_yarn_corr_dim(cfg.n_rot, cfg.rope_orig_ctx, cfg.yarn_beta_slow, base)))
    k = np.arange(n_pairs, dtype=np.float32)
    y = (k - np.float32(lo)) / np.float32(max(0.001, hi - lo))
    ramp = (1.0 - np.clip(y, 0.0, 1.0)).astype(np.float32)  # 1: extrapolate, 0: interpolate
    return _theta_scale(base, cfg.n_rot), np.float32(1.0 / cfg.rope_scale_factor), ramp


def rope_tables(cfg: ModelConfig, ctx: int) -> dict:
    """cos/sin [ctx, n_rot/2] per RoPE kind ("raw": ratio-0 layers, "compressed": the rest).

    Built once on the host as ds4 computes them: theta advanced by f32 multiplication
    pair by pair, YaRN mixed in f32, then cos/sin correctly rounded to f32 (as glibc's
    cosf/sinf; XLA's device sin/cos differ by an ulp, and differently on CPU and GPU).
    """
    out = {}
    for kind, layer in (("raw", 0), ("compressed", 1)):
        layers = [L for L in range(cfg.n_layer) if (cfg.ratio(L) != 0) == (kind == "compressed")]
        if not layers:
            continue
        theta_scale, freq_scale, ramp = layer_rope_params(cfg, layers[0])
        te = np.arange(ctx, dtype=np.float32)
        cols = []
        for k in range(cfg.n_rot // 2):
            if ramp is None:
                theta = te
            else:
                ti = (te * np.float32(freq_scale)).astype(np.float32)
                r = np.float32(ramp[k])
                theta = ((ti * (np.float32(1) - r)).astype(np.float32) + (te * r).astype(np.float32)).astype(np.float32)
            cols.append(theta)
            te = (te * theta_scale).astype(np.float32)
        theta = np.stack(cols, axis=-1).astype(np.float64)
        out[kind] = {"cos": np.cos(theta).astype(np.float32), "sin": np.sin(theta).astype(np.float32)}
    return out


def rope_angles(pos: jax.Array, cfg: ModelConfig, layer: int, tables: dict) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., n_rot/2] for integer positions ``pos`` [...] (< the tables' ctx)."""
    t = tables["compressed" if cfg.ratio(layer) else "raw"]
    return t["cos"][pos], t["sin"][pos]


def apply_rope_tail(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*len(cos) dims of x [..., hd] in adjacent pairs.

    ``cos``/``sin`` broadcast against x's leading dims ([..., n_pairs])."""
    n_rot = 2 * cos.shape[-1]
    t = x[..., -n_rot:].reshape(*x.shape[:-1], n_rot // 2, 2)
    x0, x1 = t[..., 0], t[..., 1]
    s = -sin if inverse else sin
    r0 = rounded(x0 * cos) - rounded(x1 * s)
    r1 = rounded(x0 * s) + rounded(x1 * cos)
    out = jnp.stack([r0, r1], axis=-1).reshape(*x.shape[:-1], n_rot)
    # Written back into x rather than concatenated after the head: XLA:GPU ran each concatenation
    # as a kernel of its own (128 a 43-layer decode step). H200, session 26, 8 layers, one process:
    # 2,161.0 against 2,181.4 µs of kernels a step, 12 kernels fewer; the rotation over the whole
    # head and a select lost (2,192.5).
    return x.at[..., -n_rot:].set(out)
