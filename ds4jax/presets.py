"""Model presets (``configs/presets/*.json``): the shapes and types of a model to generate.

A preset holds the ``deepseek4.*`` metadata (keys without the prefix), the routed
expert types, the MTP file's types, the vocabulary and a seed. ``preset_metadata``
turns it into the exact metadata a generated base GGUF carries.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ds4jax import config as C
from ds4jax.errors import DS4Error

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"

_TYPE_IDS = {"F32": C.F32, "F16": C.F16, "Q8_0": C.Q8_0, "Q2_K": C.Q2_K, "Q4_K": C.Q4_K, "IQ2_XXS": C.IQ2_XXS}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    model_name: str
    seed: int
    vocab: str
    metadata: dict[str, Any]  # without the "deepseek4." prefix
    gate_up_type: int
    down_type: int
    mtp_gate_up_type: int
    mtp_down_type: int
    mtp_plain_type: int
    description: str = ""


def _type(v: str, where: str) -> int:
    if v not in _TYPE_IDS:
        raise DS4Error(f"preset {where}: unknown type {v!r} (known: {', '.join(_TYPE_IDS)})")
    return _TYPE_IDS[v]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> Preset:
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise DS4Error(f"unknown preset {name_or_path!r} (known: {', '.join(list_presets())})")
    try:
        d = json.loads(path.read_text())
        et, mtp = d["expert_types"], d["mtp"]
        return Preset(
            name=path.stem,
            model_name=d["name"],
            seed=int(d["seed"]),
            vocab=d.get("vocab", "deepseek-v4"),
            metadata=dict(d["metadata"]),
            gate_up_type=_type(et["gate_up"], path.stem),
            down_type=_type(et["down"], path.stem),
            mtp_gate_up_type=_type(mtp["expert_types"]["gate_up"], path.stem),
            mtp_down_type=_type(mtp["expert_types"]["down"], path.stem),
            mtp_plain_type=_type(mtp.get("plain_type", "F32"), path.stem),
            description=d.get("description", ""),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DS4Error(f"{path}: malformed preset ({type(e).__name__}: {e})") from None


def with_layers(p: Preset, n_layer: int) -> Preset:
    """The preset cut to its first ``n_layer`` blocks (the per-layer lists cut to match), for
    benchmarks that time a few full-size layers where the whole model does not fit."""
    md = dict(p.metadata)
    total = int(md["block_count"])
    if not 1 <= n_layer <= total:
        raise DS4Error(f"--layers must be 1..{total} for preset {p.name}, got {n_layer}")
    md["block_count"] = n_layer
    for k, v in md.items():
        if isinstance(v, list) and len(v) == total:
            md[k] = v[:n_layer]
    md["hash_layer_count"] = min(int(md.get("hash_layer_count", 3)), n_layer)
    return dataclasses.replace(p, metadata=md)


def preset_metadata(p: Preset) -> dict[str, Any]:
    """Full metadata of the preset's base GGUF: general.*, deepseek4.* and tokenizer.*."""
    md: dict[str, Any] = {"general.architecture": C.ARCH, "general.name": p.model_name}
    for k, v in p.metadata.items():
        md[f"{C.ARCH}.{k}"] = v
    n_layer = p.metadata["block_count"]
    md.setdefault(f"{C.ARCH}.swiglu_clamp_exp", [10.0] * n_layer)
    # ds4 requires these keys; write ds4's values unless the preset says otherwise.
    defaults = {
        "rope.freq_base": 10000.0,
        "rope.scaling.factor": 16.0,
        "rope.scaling.yarn_beta_fast": 32.0,
        "rope.scaling.yarn_beta_slow": 1.0,
        "rope.scaling.original_context_length": 65536,
        "attention.compress_rope_freq_base": 160000.0,
        "expert_weights_scale": 1.5,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "hyper_connection.epsilon": 1e-6,
        "expert_weights_norm": True,
    }
    for k, v in defaults.items():
        md.setdefault(f"{C.ARCH}.{k}", v)
    if p.vocab == "deepseek-v4":
        from ds4jax.tokenizer_data import gguf_tokenizer_metadata

        tok_md = gguf_tokenizer_metadata()
        md[f"{C.ARCH}.vocab_size"] = len(tok_md["tokenizer.ggml.tokens"])
        md.update(tok_md)
    elif p.vocab != "none":  # "none": ids only (tests), vocab_size from the preset
        raise DS4Error(f"preset {p.name}: unknown vocabulary {p.vocab!r} (known: deepseek-v4, none)")
    return md


def tensor_type(name: str, spec: C.TensorSpec, p: Preset, mtp: bool) -> int:
    """The GGML type the preset gives tensor ``name`` (the spec's only type, or the preset's
    expert / MTP plain type where ds4 allows several)."""
    if len(spec.types) == 1:
        return next(iter(spec.types))
    if name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
        return p.mtp_gate_up_type if mtp else p.gate_up_type
    if name.endswith("ffn_down_exps.weight"):
        return p.mtp_down_type if mtp else p.down_type
    if mtp and spec.types == C.PLAIN_TYPES:
        return p.mtp_plain_type
    raise AssertionError(f"no type rule for {name}")


def preset_config(p: Preset) -> C.ModelConfig:
    return C.config_from_metadata(preset_metadata(p), src=f"preset {p.name}")


def default_cache_dir() -> Path:
    base = os.environ.get("DS4JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ds4jax"
    )
    return Path(base)
