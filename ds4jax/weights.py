"""The weights pytree: every validated GGUF tensor repacked into quant planes.

Layout (keys are GGUF names without ``blk.L.`` / ``mtp.0.`` and without the
``.weight``/``.bias`` suffix, dots turned into underscores)::

    {"token_embd": QTensor, "output": QTensor, "output_norm": ..., "output_hc_fn": ...,
     "layers": ({"attn_q_a": QTensor, ..., "attn_compressor_kv": ...}, ...),   # one dict per layer
     "mtp": {"e_proj": QTensor, ...} or None}

Layers are a tuple of dicts, not one stacked array: compressed, indexed and
hash-routed layers carry different tensors. GGUF blocks are only the disk
format; everything here is planes (``ds4jax.quant.planes``).
"""

from __future__ import annotations

from typing import Any

from ds4jax import config as C
from ds4jax.model_file import ModelFiles


def short_name(name: str) -> str:
    name = name.removeprefix(C.MTP_PREFIX)
    if name.startswith("blk."):
        name = name.split(".", 2)[2]
    for suffix in (".weight", ".bias"):
        name = name.removesuffix(suffix)
    return name.replace(".", "_")


def _pack(mf: ModelFiles, name: str):
    from ds4jax.quant import pack

    t = mf.tensor(name)
    return pack(t.raw, t.type_id, t.logical_shape)


def assemble(n_layer: int, base, mtp=None) -> dict[str, Any]:
    """The pytree from (GGUF name, tensor) pairs of the base file and, if given, the MTP file."""
    tree: dict[str, Any] = {}
    layers = [{} for _ in range(n_layer)]
    for name, t in base:
        if name.startswith("blk."):
            layers[int(name.split(".")[1])][short_name(name)] = t
        else:
            tree[short_name(name)] = t
    tree["layers"] = tuple(layers)
    tree["mtp"] = {short_name(n): t for n, t in mtp} if mtp is not None else None
    return tree


def load_weights(
    mf: ModelFiles, to_device: bool = True, expert_layout: str = "gguf", keep_free: int = 0
) -> dict[str, Any]:
    """Repack every tensor of ``mf`` into planes; put them on the default device if asked, one
    tensor at a time, the routed gate/up experts in ``expert_layout`` as far as the device's
    memory allows with ``keep_free`` bytes left (``quant.layouts.Repacker``)."""
    if not to_device:
        return assemble(
            mf.config.n_layer,
            ((n, _pack(mf, n)) for n in mf.base.tensors),
            ((n, _pack(mf, n)) for n in mf.mtp.tensors) if mf.mtp is not None else None,
        )
    from ds4jax.quant.layouts import Repacker

    put = Repacker(expert_layout, file_nbytes(mf), keep_free)
    mtp = ((n, put.keep(_pack(mf, n))) for n in mf.mtp.tensors) if mf.mtp is not None else None  # as stored
    return assemble(mf.config.n_layer, ((n, put(short_name(n), _pack(mf, n))) for n in mf.base.tensors), mtp)


def file_nbytes(mf: ModelFiles) -> int:
    """Bytes of every tensor in the base and MTP files (the planes hold the same, a few tables aside)."""
    files = [mf.base] + ([mf.mtp] if mf.mtp is not None else [])
    return sum(t.nbytes for f in files for t in f.tensors.values())
