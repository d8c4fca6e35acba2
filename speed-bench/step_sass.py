"""Every Pallas kernel of a decode program at full size, compiled for Hopper and counted, without a GPU.

    python speed-bench/step_sass.py [--layers 4] [--program decode] [--csv speed-bench/step_sass.csv]

The engine's program is traced and lowered for CUDA here as on the GPU machine: the weights are
abstract (``jax.eval_shape`` of the random weights, so nothing is allocated), ``jax.default_backend``
answers "gpu" so dispatch takes the kernels the GPU takes (``DS4JAX_KERNELS``, default ``auto``), and
each Pallas call's Triton IR is captured as it lowers. Each distinct kernel is then compiled by the pip
Triton (``sass.py``'s ``compile_and_count``; XLA's bundled Triton on the GPU machine is close, not
identical) and its SASS counted: registers, layout conversions, barriers, loads, spills. One row a
distinct kernel: its name, the model lines that call it, the calls of the program that share its code
(call sites that differ only in source locations), its grid. ``--program mtp4`` reads the MTP loop's
program (its N=1 step and its N=2 verifying step).

Why: session 45 found a Q8_0 kernel's epilogue spending 10 of its 18 layout conversions (each a
shared-memory round trip with two barriers) on a transpose it did not need, by reading one kernel's
counts; this reads them for every kernel of the step at the shapes it runs, so the next such case
shows in one table. The counts are a map, not a verdict: fewer conversions lost time in the same
session (KERNELS.md "Session 45"), so a change found here is decided on the GPU.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import importlib
import inspect
import os
import re
import sys
import traceback
import types

import jax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ab_decode import _value  # speed-bench/ab_decode.py: a variant's constant, parsed alike
from jax._src.pallas.triton import gpu_info, lowering
from sass import compile_and_count  # speed-bench/sass.py, beside this script

from ds4jax import speculative
from ds4jax.engine import Engine
from ds4jax.mtp import init_mtp_state
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.random_weights import random_weights

Kernel = collections.namedtuple("Kernel", "name warps stages grid ttir site")


def _model_line() -> str:
    """The innermost ``ds4jax/model`` frame of the Python stack: where the model calls the kernel."""
    frames = [f for f in traceback.extract_stack() if f"ds4jax{os.sep}model{os.sep}" in f.filename]
    frames = [f for f in frames if not f.filename.endswith("linear.py")] or frames  # the projection's caller
    return f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def _grid(grid) -> tuple:
    return tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) else (int(grid),)


def capture_kernels(lower) -> list[Kernel]:
    """``lower()`` with every Pallas-Triton call's module, name, warps, stages and grid recorded, and
    the model line that traced it."""
    seen: list[Kernel] = []
    inner = lowering.lower_jaxpr_to_triton_module

    def capturing(*args, **kwargs):
        res = inner(*args, **kwargs)
        caller = inspect.currentframe().f_back.f_locals  # Pallas's ``pallas_call_lowering``
        op = res.module.operation
        name = str(op.attributes["sym_name"]).strip('"')
        grid = tuple(getattr(res, "grid", ()) or ())
        seen.append(Kernel(name, caller.get("num_warps", 4), caller.get("num_stages", 3), grid, op.get_asm(), ""))
        return res

    sites: dict = {}  # (name, grid) -> the model lines that call it, recorded as the kernels are traced
    pallas_call = pl.pallas_call

    def recording(*args, **kwargs):
        key = (kwargs.get("name"), _grid(kwargs.get("grid", ())))
        sites.setdefault(key, []).append(_model_line())
        return pallas_call(*args, **kwargs)

    backend, info = jax.default_backend, gpu_info.get_gpu_info
    pl.pallas_call = recording
    lowering.lower_jaxpr_to_triton_module = capturing
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    jax.default_backend = lambda: "gpu"  # dispatch reads it at trace time: the GPU's choice of kernels
    try:
        lower()
    finally:
        lowering.lower_jaxpr_to_triton_module = inner
        jax.default_backend, gpu_info.get_gpu_info = backend, info
        pl.pallas_call = pallas_call
    return [k._replace(site="+".join(sorted(set(sites.get((k.name, k.grid), ["?"]))))) for k in seen]


class _CudaJit(types.ModuleType):
    """``jax`` for the engine module, whose ``jit(...).lower(*args)`` lowers for CUDA instead of the
    machine's backend (``Engine.lower`` takes no platform)."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def jit(fn, **kw):
        jitted = jax.jit(fn, **kw)
        return types.SimpleNamespace(lower=lambda *args: jitted.trace(*args).lower(lowering_platforms=("cuda",)))


def lower_for_cuda(eng: Engine, program: str):
    """``eng.lower(program)``, lowered for CUDA; ``mtpK``: the MTP loop of K steps a call (its N=1
    step and its N=2 verifying step, both branches of one program), as the decoder lowers it."""
    mod = speculative if program.startswith("mtp") else sys.modules[Engine.__module__]
    real = mod.jax
    mod.jax = _CudaJit("jax")
    try:
        if mod is speculative:
            steps = int(program[3:] or 1)
            io = speculative.step_io(1, 2, 0.0, 0.0, eng.ctx, steps)
            return speculative.lower_step(eng, jax.eval_shape(eng.new_state), init_mtp_state(eng.cfg), io)
        return eng.lower(program)
    finally:
        mod.jax = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-q2")
    ap.add_argument("--layers", type=int, default=4, help="the first N blocks (0: all)")
    ap.add_argument(
        "--program",
        default="decode",
        help="an Engine program (decode, decode_fed, decode_loop4, ...) or mtpK, the MTP loop of K steps a call",
    )
    ap.add_argument("--layout", default="nib", choices=("gguf", "nib"), help="the routed gate/up experts' layout")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/step_sass")
    ap.add_argument("--csv", default="", help="also write the table here")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="package.module.NAME=value, a module constant while the program is traced (as ab_decode.py's "
        "variants), e.g. pallas_kernels.hc_pre.GATES_WARPS=1; repeatable",
    )
    a = ap.parse_args()
    for item in a.set:
        path, _, value = item.partition("=")
        mod, _, name = path.rpartition(".")
        setattr(importlib.import_module(mod), name, _value(value))
    p = load_preset(a.preset)
    if a.layers:
        p = with_layers(p, a.layers)
    cfg = preset_config(p)
    mtp = a.program.startswith("mtp")
    weights = jax.eval_shape(lambda: random_weights(cfg, p, mtp=mtp, expert_layout=a.layout))
    eng = Engine(types.SimpleNamespace(config=cfg), ctx=a.ctx, chunk=64, weights=weights)
    kernels = capture_kernels(lambda: lower_for_cuda(eng, a.program))
    groups: dict[str, list[Kernel]] = {}
    for k in kernels:
        body = re.sub(r"\s*loc\((?:[^()]|\([^()]*\))*\)", "", k.ttir)  # call sites differ only in locations
        body = "\n".join(line for line in body.splitlines() if not line.startswith("#loc"))
        groups.setdefault(hashlib.sha1(body.encode()).hexdigest()[:12], []).append(k)
    cols = [
        "name",
        "site",
        "calls",
        "grid",
        "warps",
        "registers",
        "instructions",
        "convert_layout",
        "BAR",
        "LDG (plain)",
    ]
    cols += ["LDGSTS (async)", "LDS", "STS", "IDP (dp4a)", "LDL/STL (spills)", "shared_bytes"]
    rows = []
    for digest, ks in groups.items():
        k = ks[0]
        counts = compile_and_count(k.ttir, f"{k.name}_{digest}", k.warps, k.stages, a.dir)
        grid = "x".join(map(str, k.grid))
        rows.append({"name": k.name, "site": k.site, "calls": len(ks), "grid": grid, "warps": k.warps, **counts})
    rows.sort(key=lambda r: (-int(r["BAR"]), r["name"]))
    print(
        f"{a.preset}, {cfg.n_layer} layers, {a.program}: {len(kernels)} Pallas calls in the program, {len(rows)} distinct"
    )
    print("  ".join(f"{c[:9]:>9s}" if i > 1 else f"{c:22s}" for i, c in enumerate(cols)))
    for r in rows:
        print("  ".join(f"{str(r[c])[:9]:>9s}" if i > 1 else f"{str(r[c])[:22]:22s}" for i, c in enumerate(cols)))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
