"""Random weights for a preset, made on the device: full-size benchmarks without a GGUF file.

The real q2 model is 81 GB and cannot be written here (nor quantized in NumPy in useful time),
so ``speed-bench/decode_full.py`` builds the weights pytree directly: the same keys, plane
shapes and dtypes as ``weights.load_weights`` gives for the preset's GGUF (a test checks this
against a generated file), with random contents generated on the default device, so nothing
crosses from the host. Values are random but in range: any bytes are valid quant blocks, the
block scales are sized so that a unit-RMS input gives outputs of order one, norm weights sit
near 1 and the hash layers' expert ids are valid experts.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from ds4jax import config as C
from ds4jax.presets import Preset, tensor_type
from ds4jax.quant import QTensor, pack
from ds4jax.quant.formats import QType, row_nbytes
from ds4jax.quant.layouts import Repacker
from ds4jax.quant.planes import tree_nbytes
from ds4jax.weights import assemble, short_name

# |dequantized weight| per unit of block scale, roughly: d x the typical integer a block holds
# (Q8_0: |q| ~ 73; Q2_K: sc·q ~ 11; Q4_K: sc·q ~ 240; IQ2_XXS: (2ls+1)/8 · grid ~ 47).
_TYPICAL_INT = {QType.Q8_0: 73.0, QType.Q2_K: 11.0, QType.Q4_K: 240.0, QType.IQ2_XXS: 47.0}


def plane_specs(qtype: int, shape: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """The planes ``quant.pack`` makes for a tensor of ``qtype`` and logical ``shape``."""
    lead, n = tuple(shape[:-1]), shape[-1]
    one = pack(np.zeros(row_nbytes(qtype, n), np.uint8), qtype, (1,) * len(lead) + (n,))
    return {k: jax.ShapeDtypeStruct(lead + p.shape[len(lead) :], p.dtype) for k, p in one.planes.items()}


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind", "scale"))
def _random(key, shape, dtype, kind: str, scale: float):
    if kind == "bits":  # any bytes / words: valid quant fields
        bits = jax.random.bits(key, shape, jnp.uint8 if jnp.dtype(dtype).itemsize == 1 else jnp.uint32)
        return jax.lax.bitcast_convert_type(bits, dtype)
    if kind == "six_bits":  # Q4_K's unpacked 6-bit scales and mins
        return jax.random.randint(key, shape, 0, 64, jnp.int32).astype(dtype)
    if kind == "ids":  # hash-layer expert ids in [0, scale)
        return jax.random.randint(key, shape, 0, int(scale), jnp.int32).astype(dtype)
    if kind == "scale":  # block scales in [0.5, 1.5] x scale
        return (jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5) * scale).astype(dtype)
    if kind == "near_one":
        return (1.0 + 0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)  # "normal"


def _plane_kind(name: str, qtype: int, plane: str, shape, n_expert: int) -> tuple[str, float]:
    n_in = shape[-1]
    if plane == "w":  # plain tensors
        if qtype == QType.I32:
            return "ids", float(n_expert)
        if "norm" in name:
            return "near_one", 0.0
        if name == "token_embd":
            return "normal", 1.0
        return "normal", (n_in**-0.5 if len(shape) > 1 else 0.1)
    if plane in ("d", "dmin"):
        return "scale", 1.0 / (_TYPICAL_INT[QType(qtype)] * n_in**0.5)
    if qtype == QType.Q4_K and plane in ("sc", "m"):
        return "six_bits", 0.0
    return "bits", 0.0


def random_tensor(key, name: str, qtype: int, shape: tuple[int, ...], n_expert: int) -> QTensor:
    """One tensor's planes, random on the default device (``name`` the weights' short name)."""
    planes = {}
    for i, (plane, sds) in enumerate(sorted(plane_specs(qtype, shape).items())):
        kind, scale = _plane_kind(name, qtype, plane, shape, n_expert)
        planes[plane] = _random(jax.random.fold_in(key, i), sds.shape, sds.dtype, kind, scale)
    return QTensor(int(qtype), tuple(shape), planes)


def random_weights(
    cfg: C.ModelConfig,
    preset: Preset,
    seed: int = 0,
    mtp: bool = False,
    expert_layout: str = "gguf",
    keep_free: int = 0,
) -> dict:
    """The weights pytree of ``load_weights`` for the preset's base (and MTP) file, random; the
    routed gate/up experts in ``expert_layout`` as each is made, as far as the device's memory
    allows with ``keep_free`` bytes left (``quant.layouts.Repacker``)."""
    key = jax.random.key(seed)
    files = [(C.base_tensor_specs(cfg), False)] + ([(C.mtp_tensor_specs(cfg), True)] if mtp else [])
    total = sum(  # every tensor still to come counts against the repack's room, the MTP block's too
        tree_nbytes(plane_specs(tensor_type(n, s, preset, is_mtp), tuple(reversed(s.ne))))
        for specs, is_mtp in files
        for n, s in specs.items()
    )
    put = Repacker(expert_layout, total, keep_free)

    def make(specs: dict[str, C.TensorSpec], is_mtp: bool):
        for name, spec in specs.items():
            qtype = tensor_type(name, spec, preset, is_mtp)
            k = jax.random.fold_in(key, zlib.crc32(name.encode()))
            short = short_name(name)
            qt = random_tensor(k, short, qtype, tuple(reversed(spec.ne)), cfg.n_expert)
            yield name, put.keep(qt) if is_mtp else put(short, qt)  # the MTP block's experts stay as made

    return assemble(cfg.n_layer, *(make(specs, is_mtp) for specs, is_mtp in files))


def bytes_per_token(weights: dict, cfg: C.ModelConfig) -> int:
    """Weight bytes one decode step reads: every tensor, except one row of the token embedding,
    n_used of the n_expert routed experts and one column of the hash layers' id table (the MTP
    block is not counted)."""
    tensors = [(k, v) for k, v in weights.items() if isinstance(v, QTensor)]
    tensors += [(k, v) for layer in weights["layers"] for k, v in layer.items()]
    total = 0
    for name, t in tensors:
        nbytes = t.nbytes
        if name in ("token_embd", "ffn_gate_tid2eid"):
            nbytes //= cfg.n_vocab
        elif name.endswith("_exps"):
            nbytes = nbytes * cfg.n_expert_used // cfg.n_expert
        total += nbytes
    return total
