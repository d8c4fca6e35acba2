"""Write a base GGUF and an MTP GGUF in ds4's exact layout from a preset.

    python -m ds4jax.tools.make_model --preset tiny --out DIR

Deterministic: the same preset and seed give byte-identical files. Tensor
names, GGUF dims, types and metadata are those ds4 validates (MODEL.md §2,
SPECULATIVE.md §1.2); values come from ``ds4jax.synthetic``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from ds4jax import config as C
from ds4jax.errors import DS4Error
from ds4jax.gguf_write import write_gguf
from ds4jax.presets import Preset, load_preset, preset_metadata, tensor_type
from ds4jax.synthetic import synth_values

# Writing more than this needs --force: the full-size presets are ~80-160 GB.
MAX_BYTES_WITHOUT_FORCE = 2 << 30


def _encode(values: np.ndarray, type_id: int) -> np.ndarray:
    if type_id == C.F32:
        return values.astype(np.float32)
    if type_id == C.F16:
        return values.astype(np.float16)
    if type_id == C.I32:
        return values.astype(np.int32)
    from ds4jax.quant import encode

    return encode(values, type_id)


def _tensors(cfg: C.ModelConfig, specs: dict[str, C.TensorSpec], p: Preset, mtp: bool):
    for name, spec in specs.items():
        t = tensor_type(name, spec, p, mtp)
        shape = tuple(reversed(spec.ne))
        yield name, _encode(synth_values(cfg, name, shape, p.seed), t), t, spec.ne


def _planned_bytes(specs: dict[str, C.TensorSpec], p: Preset, mtp: bool) -> int:
    from ds4jax.quant import tensor_nbytes

    return sum(tensor_nbytes(tensor_type(n, s, p, mtp), tuple(reversed(s.ne))) for n, s in specs.items())


def model_paths(out_dir: str | os.PathLike, preset_name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{preset_name}.gguf", out / f"{preset_name}-mtp.gguf"


def generate_model(preset: str | Preset, out_dir: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Write ``<out>/<preset>.gguf`` and ``<out>/<preset>-mtp.gguf``; returns their paths."""
    p = load_preset(preset) if isinstance(preset, str) else preset
    md = preset_metadata(p)
    cfg = C.config_from_metadata(md, src=f"preset {p.name}")

    base_specs, mtp_specs = C.base_tensor_specs(cfg), C.mtp_tensor_specs(cfg)
    total = _planned_bytes(base_specs, p, False) + _planned_bytes(mtp_specs, p, True)
    if total > MAX_BYTES_WITHOUT_FORCE and not force:
        raise DS4Error(f"preset {p.name} would write {total / 1e9:.1f} GB; pass --force to write it anyway")

    base_path, mtp_path = model_paths(out_dir, p.name)
    base_path.parent.mkdir(parents=True, exist_ok=True)
    mtp_md = {"general.architecture": C.ARCH, "general.name": f"{p.model_name}-MTP"}
    # Write to temporary names and rename, so a crash never leaves a half model behind.
    for path, meta, specs, is_mtp in ((base_path, md, base_specs, False), (mtp_path, mtp_md, mtp_specs, True)):
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            write_gguf(tmp, meta, _tensors(cfg, specs, p, is_mtp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return base_path, mtp_path


def run(argv: list[str] | None = None) -> int:
    from absl import app, flags

    flags.DEFINE_string("preset", "tiny", "preset name (configs/presets/NAME.json) or a preset JSON path")
    flags.DEFINE_string("out", None, "output directory")
    flags.DEFINE_bool("force", False, "allow writing presets larger than 2 GiB")
    flags.mark_flag_as_required("out")

    def main(_argv):
        if len(_argv) > 1:
            print(f"make_model: unexpected arguments: {' '.join(_argv[1:])}", file=sys.stderr)
            return 2
        F = flags.FLAGS
        t0 = time.time()
        try:
            b, m = generate_model(F.preset, F.out, force=F.force)
        except DS4Error as e:
            print(f"make_model: {e}", file=sys.stderr)
            return 1
        for path in (b, m):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        print(f"done in {time.time() - t0:.1f} s")
        return 0

    try:
        app.run(main, argv=argv if argv is not None else sys.argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(run())
