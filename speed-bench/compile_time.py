"""Compile time of the engine's programs at full size, by number of layers (no weights made).

    python speed-bench/compile_time.py [--preset flash-q2] [--layers 1,2,4] [--programs decode,prefill,prefill_layers]

The programs are compiled against abstract weights (``jax.eval_shape`` of ``random_weights``),
so this needs no device memory; ``DS4JAX_KERNELS`` and ``XLA_FLAGS`` select what is compiled.
Prints seconds and temporaries per program; the slope over layers is the per-layer cost.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds4jax.engine import Engine
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.random_weights import random_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-q2")
    ap.add_argument("--layers", default="1,2,4")
    ap.add_argument("--programs", default="decode,prefill")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument(
        "--pad_gb",
        type=float,
        default=0.0,
        help="an unused abstract input of this many GB beside the weights: the whole model's input size at a "
        "few layers (XLA's scheduler and rematerialization plan against the device memory the inputs leave)",
    )
    ap.add_argument(
        "--options", default="", help="XLA options for the compiles, name=value,... (Engine compiler_options)"
    )
    a = ap.parse_args()
    options = dict(kv.split("=", 1) for kv in a.options.split(",") if kv)
    tag = f"{jax.devices()[0].device_kind} pad={a.pad_gb} GB options={a.options!r} kernels={os.environ.get('DS4JAX_KERNELS', 'auto')} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    for n in (int(s) for s in a.layers.split(",")):
        p = with_layers(load_preset(a.preset), n)
        cfg = preset_config(p)
        w = jax.eval_shape(functools.partial(random_weights, cfg, p))
        if a.pad_gb:
            w["pad"] = jax.ShapeDtypeStruct((int(a.pad_gb * 1e9),), jnp.uint8)
        eng = Engine(
            types.SimpleNamespace(config=cfg),
            ctx=a.ctx,
            chunk=64,
            weights=w,
            compiler_options=options,
            layered_prefill=True,
        )
        for name in a.programs.split(","):
            if name == "prefill_layers":  # the layered prefill's programs, compiled side by side as the engine does
                t0 = time.perf_counter()
                eng.compile(["prefill"])
                parts = ", ".join(f"{k} {v:.1f}" for k, v in eng.compile_s.items() if k.startswith("prefill."))
                print(f"{tag}: {n} layers prefill_layers: {time.perf_counter() - t0:.1f} s ({parts})", flush=True)
                continue
            t0 = time.perf_counter()
            lowered = eng.lower(name)  # tracing + Pallas lowering
            t1 = time.perf_counter()
            m = lowered.compile().memory_analysis()  # XLA (and Triton) compilation
            t2 = time.perf_counter()
            temp = m.temp_size_in_bytes / 1e9 if m is not None else float("nan")
            print(
                f"{tag}: {n} layers {name}: lower {t1 - t0:.1f} s + compile {t2 - t1:.1f} s, {temp:.2f} GB temporaries",
                flush=True,
            )


if __name__ == "__main__":
    main()
