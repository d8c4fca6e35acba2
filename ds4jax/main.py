"""ds4jax command line.

    python -m ds4jax.main                      # the embedded default model
    python -m ds4jax.main --model M.gguf --mtp M-mtp.gguf

Loads the model (open, validate, repack every tensor into quant planes on the
default JAX device) and prints its summary. Text generation arrives with the
forward pass.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from ds4jax.cli import fail, parse_flags
from ds4jax.errors import DS4Error

PROG = "ds4jax"

flags.DEFINE_string("model", None, "base GGUF (default: the embedded default model)")
flags.DEFINE_string("mtp", None, "MTP GGUF (default: the default model's MTP file when --model is not given)")
flags.DEFINE_bool("load", True, "repack all tensors into quant planes on the JAX device (--noload: validate only)")

FLAGS = flags.FLAGS


def main(argv: list[str] | None = None) -> int:
    parse_flags(list(argv if argv is not None else sys.argv), PROG)
    try:
        model, mtp = FLAGS.model, FLAGS.mtp
        if model is None:
            from ds4jax.default_model import default_model_paths

            model, default_mtp = default_model_paths()
            mtp = mtp or str(default_mtp)
        from ds4jax.model_file import open_model
        from ds4jax.summary import model_summary

        t0 = time.perf_counter()
        mf = open_model(model, mtp)
        t1 = time.perf_counter()
        print(model_summary(mf))
        print(f"opened     {t1 - t0:.2f} s (validated {len(mf.base.tensors)} tensors)")
        if FLAGS.load:
            import jax

            from ds4jax.weights import load_weights

            w = load_weights(mf)
            jax.block_until_ready(w)
            dev = jax.devices()[0]
            print(f"loaded     {time.perf_counter() - t1:.2f} s into quant planes on {dev.platform}:{dev.id}")
    except DS4Error as e:
        fail(PROG, e)
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
