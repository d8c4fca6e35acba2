"""Synthetic weight values for generated models, by tensor role.

Scales are chosen so activations stay near unit RMS through the network: every
projection is N(0, 1/in) so a unit-RMS input gives a unit-RMS output; the
projections that write into the residual streams (attention output B, expert
and shared down) are further scaled by 1/sqrt(n_layer) so the streams grow
slowly over depth; the LM head gives logits of std ~2.5 (peaked but not
one-hot). Hyper-connection biases start near identity mixing (comb diagonal
+3), as a trained model's do, so the streams do not wash out.

Values are a pure function of (seed, tensor name): adding a tensor to the
inventory does not change any other tensor.
"""

from __future__ import annotations

import zlib

import numpy as np

from ds4jax.config import ModelConfig


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _normal(rng, shape, std) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _hc_base(rng, n_hc: int, with_comb: bool) -> np.ndarray:
    pre = _normal(rng, (n_hc,), 0.1)
    if not with_comb:  # HC head bias: [n_hc]
        return pre
    post = -1.0 + _normal(rng, (n_hc,), 0.2)
    comb = 3.0 * np.eye(n_hc, dtype=np.float32) + _normal(rng, (n_hc, n_hc), 0.3)
    return np.concatenate([pre, post, comb.reshape(-1)]).astype(np.float32)


def synth_values(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values of tensor ``name`` with logical (row-major) ``shape``: float32, or int32 for tid2eid."""
    rng = tensor_rng(seed, name)
    base = name.split(".", 2)[-1] if name.startswith(("blk.", "mtp.")) else name
    deep = 1.0 / np.sqrt(cfg.n_layer)
    fan_in = shape[-1]

    if base == "ffn_gate_tid2eid.weight":  # (vocab, n_used): distinct experts per token
        keys = rng.random((shape[0], cfg.n_expert))
        return np.argsort(keys, axis=1)[:, : shape[1]].astype(np.int32)
    if base == "token_embd.weight":
        return _normal(rng, shape, 1.0)
    if base == "output.weight":
        return _normal(rng, shape, 2.5 / np.sqrt(fan_in))
    if base.endswith("_base.weight"):  # HC mixer bias (layer) or HC head bias
        return _hc_base(rng, cfg.n_hc, with_comb=shape[0] == cfg.mix_hc)
    if base.endswith("_scale.weight"):  # HC (pre, post, comb) scales or the head scale
        return (0.5 + _normal(rng, shape, 0.1)).astype(np.float32)
    if base.endswith("norm.weight"):
        return (1.0 + _normal(rng, shape, 0.1)).astype(np.float32)
    if base == "attn_sinks.weight":
        return _normal(rng, shape, 0.5)
    if base == "exp_probs_b.bias":
        return _normal(rng, shape, 0.1)
    if base.endswith("compressor_ape.weight"):
        return _normal(rng, shape, 0.5)
    if base in ("attn_output_b.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight"):
        return _normal(rng, shape, deep / np.sqrt(fan_in))
    if len(shape) >= 2:
        return _normal(rng, shape, 1.0 / np.sqrt(fan_in))
    raise ValueError(f"no synthetic rule for tensor {name!r} of shape {shape}")
