"""The plain decode step's wall time in one process before and after MTP step programs are
compiled and run (sessions 33-35 and 49-50: the plain step runs ~0.5 ms slower once the MTP
program has run, lasting after it is deleted, with no more kernel time and no CUDA graph
re-recorded; session 50, KERNELS.md). Session 51: it follows the MTP program's loop and switch as
CUDA-graph conditional nodes (the same program with them out of the graph, ``nocond`` below, leaves
the plain step as it was; a small program with conditional nodes does too):

    python speed-bench/mtp_presence.py --layers 0 --fill 2048 --rounds 5 --steps 24 --together \
        --mtp "nocond:xla_gpu_enable_command_buffer=FUSION+CUBLAS+CUBLASLT+CUSTOM_CALL+CUDNN+\
DYNAMIC_SLICE_FUSION;mtp:" --order nocond,cond,mtp --trace 8

Phases, each timing the plain loop (``decode_loop``, ``--steps_per_call`` steps a call, the token
read a call late as ``Engine.generate`` does):
  alone          the plain program only (the MTP block's weights loaded, as the CLI's --mtp_draft
                 does); left out with --together, which compiles every program first
  compiled       the MTP programs compiled, none run
  after X        after one call of X, each X of --order in turn: an MTP program's label, or
                 ``cond``: a small program with CUDA-graph conditional nodes (as the MTP step's
                 loop and switch are)
  X steps        (X an MTP program) its own steps, ms a step (``--margin``: 0 verifies every
                 step, 1e9 none); with --trace, traced too
  dropped        the MTP programs and their outputs deleted (their CUDA graphs freed with them)
The order matters: what a run leaves behind lasts, so programs suspected of nothing go first.
``--mtp``: ``label:key=value,...`` programs separated by ';', each key an XLA option for that MTP
program only ('+' between a list's items). Rows go to ``$OUT/mtp_presence.csv``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import devtime  # speed-bench/devtime.py, beside this script
from ab_decode import (  # ab_decode's MTP program, io and state print
    CHUNK,
    _value,
    by_family,
    fingerprint,
    kernel_diffs,
    mtp_io,
    mtp_lower,
)

from ds4jax import speculative, xla_options
from ds4jax.bench import copy_tree
from ds4jax.engine import Engine, compile_together, layout_keep_free, peek
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.quant.layouts import expert_layout_counts
from ds4jax.random_weights import random_weights
from ds4jax.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-q2")
    ap.add_argument("--layers", type=int, default=4, help="keep the first N blocks (0: all)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--fill", type=int, default=2048, help="prompt tokens prefilled before the phases")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="steps a round, plain and MTP")
    ap.add_argument("--steps_per_call", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--trace",
        type=int,
        default=0,
        help="steps traced in each phase, the CUDA graph's kernels side by side: the timeline "
        "(span, busy, idle) and the kernel families that moved against the first phase (the plain "
        "step's phases, and the MTP programs' steps against the first of them)",
    )
    ap.add_argument("--margin", type=float, default=0.0, help="the margin an MTP draft needs (0: every step verifies)")
    ap.add_argument("--mtp", default="mtp:", help="MTP programs: label:xla_key=value,... separated by ';'")
    ap.add_argument(
        "--order", default="", help="what runs before each 'after' phase: labels or 'cond' (default: --mtp's)"
    )
    ap.add_argument("--together", action="store_true", help="compile every program first (no 'alone' phase)")
    a = ap.parse_args()
    xla_options.configure()
    p = load_preset(a.preset)
    if a.layers:
        p = with_layers(p, a.layers)
    cfg = preset_config(p)
    keep = layout_keep_free(cfg, a.ctx, CHUNK)
    weights = jax.block_until_ready(random_weights(cfg, p, mtp=True, expert_layout="auto", keep_free=keep))
    print("gate/up expert tensors as nibbles: {} of {}".format(*expert_layout_counts(weights)), flush=True)
    # traced as they run (the graph, kernels side by side), not op by op as the profiler makes XLA do
    xla = {"xla_enable_command_buffers_during_profiling": True} if a.trace else {}
    eng = Engine(types.SimpleNamespace(config=cfg), ctx=a.ctx, chunk=CHUNK, weights=weights, compiler_options=xla)
    K = a.steps_per_call
    name = f"decode_loop{K}"
    programs = parse_programs(a.mtp, eng.compiler_options)
    order = [t.strip() for t in (a.order or ",".join(programs)).split(",") if t.strip()]
    for t in order:
        if t != "cond" and t not in programs:
            raise SystemExit(f"--order: {t!r} is neither 'cond' nor a label of --mtp ({', '.join(programs)})")
    mtp: dict = {}  # label: compiled MTP program

    def build_mtp(label: str):
        mtp[label] = mtp_lower(eng, a.ctx, K).compile(compiler_options=programs[label] or None)

    builds = [lambda lb=lb: build_mtp(lb) for lb in programs]
    t0 = time.perf_counter()
    if a.together:  # all at once (minutes fewer); the first phase is then "compiled"
        compile_together([lambda: eng.compile([name, "prefill"]), *builds])
    else:
        eng.compile([name, "prefill"])
    print(f"programs compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    params, key = SamplingParams(temperature=0.0).arrays(), jax.random.key(0)
    ids = np.random.default_rng(0).integers(0, cfg.n_vocab, a.fill)
    _, _, filled = eng.prefill(eng.new_state(), ids, params, key)
    box = [copy_tree(filled), eng.new_io(1, K)]

    def plain_call():
        box[0], box[1] = eng.decode_loop(box[0], box[1], params, key, K)
        return box[1]

    boxes: dict = {}  # label: (state, (mtp_state, io)) of that MTP program's own run

    def mtp_call(label: str):
        st, (ms, io) = boxes[label]
        st, ms, io = mtp[label](eng.weights, st, ms, io)
        boxes[label] = (st, (ms, io))
        return io

    def timed_round(call, read, steps: int = a.steps) -> float:
        """ms a step over calls of ``call`` (K steps each) for ``steps``, each call's ``read`` copy
        (its tokens or reports) read after the next call is dispatched, as generate does."""
        late, t0, calls = None, time.perf_counter(), max(1, steps // K)
        for _ in range(calls):
            out = call()
            if late is not None:
                np.asarray(late)
            late = read(out)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / (calls * K) * 1e3

    def plain_round() -> float:
        return timed_round(plain_call, lambda io: peek(io, False)[0])

    rows, tallies, mtp_tallies = [], {}, {}  # kernel families of the plain phases, of the MTP steps

    def phase(label: str, timed=plain_round, call=plain_call):
        timed()  # warm: the first call after a phase change is not timed
        ts = [timed() for _ in range(a.rounds)]
        ts.sort()
        med = ts[len(ts) // 2]
        print(f"{label:14s} {med:7.3f} ms a step median (min {ts[0]:.3f}, max {ts[-1]:.3f})", flush=True)
        rows.append([label, f"{med:.3f}", f"{ts[0]:.3f}", f"{ts[-1]:.3f}"])
        if a.trace:
            plain = call is plain_call
            print(f"{label}: timeline of {a.trace} {'plain' if plain else 'MTP'} steps", flush=True)
            calls = max(1, a.trace // K)
            ns, by = devtime.trace_calls(call, calls, devtime.classify, K)
            print(f"{label}: {ns / (calls * K) / 1e3:.1f} us of kernels a step", flush=True)
            (tallies if plain else mtp_tallies)[label] = (by_family(by), calls * K)

    if not a.together:
        phase("alone")
        t0 = time.perf_counter()
        compile_together(builds)
        print(f"MTP programs compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    for label in programs:
        boxes[label] = (copy_tree(filled), mtp_io(eng, a.margin, a.ctx, K))
    phase("compiled")
    for t in order:
        if t == "cond":
            jax.block_until_ready(tiny_cond_program()(jnp.linspace(-1.0, 1.0, 4096, dtype=jnp.float32)))
            phase("after cond")
        else:
            jax.block_until_ready(mtp_call(t))
            phase(f"after {t}")
            step = lambda t=t: mtp_call(t)
            phase(f"{t} steps", timed=lambda step=step: timed_round(step, speculative.peek_report), call=step)
    for label in programs:  # the same steps from the same state: XLA's options move no bit
        if label in order:
            print(f"{label} state after its steps: {fingerprint(boxes[label][0]):#018x}", flush=True)
    mtp.clear()
    boxes.clear()
    gc.collect()
    phase("dropped")
    for t in (tallies, mtp_tallies):
        if t:
            kernel_diffs(t, 15)
    print(f"plain state after the phases: {fingerprint(box[0]):#018x}", flush=True)
    card = jax.devices()[0].device_kind
    header = ["card", "preset", "layers", "phase", "ms_median", "ms_min", "ms_max", "note"]
    with devtime.csv_rows(a.out, "mtp_presence.csv", header) as write:
        for r in rows:
            write([card, p.name, cfg.n_layer, *r, a.note])


def parse_programs(text: str, base: dict | None) -> dict:
    """{label: XLA options} of ``label:key=value,...;...`` (each program's options over ``base``)."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        label, _, opts = item.partition(":")
        if not label or label == "cond" or label in out:
            raise SystemExit(f"--mtp: bad or repeated label {label!r}")
        xla = dict(base or {})
        for kv in filter(None, (x.strip() for x in opts.split(","))):
            k, eq, v = kv.partition("=")
            if not eq or not k.startswith("xla_"):
                raise SystemExit(f"--mtp {label}: {kv!r} is not xla_key=value")
            xla[k] = _value(v.replace("+", ","))
        out[label] = xla
    return out


def tiny_cond_program():
    """A small compiled program with a data-dependent while loop around a branch, every op in
    the CUDA graph (``xla_gpu_graph_min_graph_size=1``): XLA can record the loop and the branch
    as conditional nodes, as it records the MTP step's switch (session 41)."""

    def body(c):
        i, x = c
        x = lax.cond(x.sum() > 0, lambda x: jnp.sin(x) * 2.0, lambda x: jnp.cos(x) + 1.0, x)
        return i + 1, x / (1.0 + jnp.abs(x).max())

    fn = jax.jit(lambda x: lax.while_loop(lambda c: (c[0] < 8) & (c[1][0] < 1e9), body, (0, x))[1])
    return fn.lower(jax.ShapeDtypeStruct((4096,), jnp.float32)).compile(
        compiler_options={"xla_gpu_graph_min_graph_size": 1} if jax.default_backend() == "gpu" else None
    )


if __name__ == "__main__":
    main()
