"""Open a base GGUF (and optionally an MTP GGUF) and validate them against the config.

``open_model`` is the one entry point: it reads the metadata into a
``ModelConfig``, then checks the tensor inventory (names, GGUF dims, types,
block divisibility) against ``config.base_tensor_specs`` / ``mtp_tensor_specs``.
Nothing is decoded here; ``weights.py`` repacks the validated tensors.
"""

from __future__ import annotations

import dataclasses
import os

from ds4jax import config as C
from ds4jax.errors import DS4Error
from ds4jax.gguf_file import GGUFFile, TensorInfo

# Block element counts of the quantized types (the codecs live in ds4jax.quant).
_BLOCK_ELEMS = {C.Q8_0: 32, C.Q2_K: 256, C.Q4_K: 256, C.IQ2_XXS: 256}


def type_name(type_id: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type#{type_id}"


def _names(types) -> str:
    return "/".join(sorted(type_name(t) for t in types))


def validate_tensors(g: GGUFFile, specs: dict[str, C.TensorSpec], what: str) -> None:
    src = g.path
    for name, spec in specs.items():
        t = g.tensors.get(name)
        if t is None:
            if spec.optional:
                continue
            raise DS4Error(f"{src}: missing tensor {name!r} ({what})")
        if t.ne != spec.ne:
            raise DS4Error(f"{src}: tensor {name!r} has dims {list(t.ne)}, expected {list(spec.ne)}")
        if t.type_id not in spec.types:
            raise DS4Error(
                f"{src}: tensor {name!r} has unsupported type {type_name(t.type_id)} (expected {_names(spec.types)})"
            )
        blk = _BLOCK_ELEMS.get(t.type_id, 1)
        if t.ne[0] % blk:
            raise DS4Error(f"{src}: tensor {name!r} row of {t.ne[0]} is not a multiple of the {blk}-element block")
    extra = [n for n in g.tensors if n not in specs]
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DS4Error(f"{src}: unexpected tensor {extra[0]!r}{more} for this {what}")
    # Gate and up experts are read as one pair: ds4 requires the same type.
    for name in specs:
        if name.endswith("ffn_gate_exps.weight"):
            up = name.replace("ffn_gate_exps", "ffn_up_exps")
            a, b = g.tensors[name].type_id, g.tensors[up].type_id
            if a != b:
                raise DS4Error(f"{src}: {name!r} is {type_name(a)} but {up!r} is {type_name(b)}; they must match")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    config: C.ModelConfig
    base: GGUFFile
    mtp: GGUFFile | None

    def tensor(self, name: str) -> TensorInfo:
        if name.startswith(C.MTP_PREFIX):
            assert self.mtp is not None
            return self.mtp.tensors[name]
        return self.base.tensors[name]


def open_model(base_path: str | os.PathLike, mtp_path: str | os.PathLike | None = None) -> ModelFiles:
    base = GGUFFile(base_path)
    cfg = C.config_from_metadata(base.metadata, src=base.path)
    validate_tensors(base, C.base_tensor_specs(cfg), "DeepSeek V4 base model")
    mtp = None
    if mtp_path is not None:
        mtp = GGUFFile(mtp_path)
        arch = mtp.metadata.get("general.architecture")
        if arch is not None and arch != C.ARCH:
            raise DS4Error(f"{mtp.path}: wrong architecture {arch!r} for an MTP file (need {C.ARCH!r})")
        if not any(n.startswith(C.MTP_PREFIX) for n in mtp.tensors):
            raise DS4Error(f"{mtp.path}: not an MTP file (no {C.MTP_PREFIX}* tensors)")
        # Shapes come from the base config, so a mismatched pair fails here by name.
        try:
            validate_tensors(mtp, C.mtp_tensor_specs(cfg), "MTP file")
        except DS4Error as e:
            raise DS4Error(f"{e} — MTP file does not match base model {base.path}") from None
    return ModelFiles(cfg, base, mtp)
