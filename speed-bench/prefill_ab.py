"""Prefill variants timed interleaved in one process (the prefill's counterpart of ab_decode.py).

    python speed-bench/prefill_ab.py --layers 8 --tokens 1024 --rounds 5 --chunks 64,256 \\
        --variants "base;xla:kernels=off" [--profile]

Random weights of the preset's shapes made on the GPU (the routed gate/up experts as nibbles as
far as memory allows), one engine per variant and prefill chunk on those weights (the engine's
prefill: one program per kind of block on a GPU), its programs traced under the variant's module constants and XLA
options (``ab_decode.py``'s variant syntax: ``label:module.NAME=value,xla_...=value``). Each round
prefills ``--tokens`` random tokens from an empty state with every variant in turn; the median
tokens/s of the rounds is reported, with a 64-bit print of each variant's final state and logits
(equal prints: the same bits). ``--profile`` (GPU): one more prefill of each engine under the
profiler, its kernels' time by kind (``devtime.classify``), the largest kernels by name, and the
kernels' time by the model line that made them (``devtime.by_source``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import devtime  # speed-bench/devtime.py, beside this script
from ab_decode import fingerprint, parse_variant, traced_under  # speed-bench/ab_decode.py, beside this script

from ds4jax import xla_options
from ds4jax.engine import Engine, layout_keep_free
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.random_weights import random_weights
from ds4jax.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-q2")
    ap.add_argument("--layers", type=int, default=8, help="keep the first N blocks (0: all)")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt tokens a round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="base", help="';'-separated variants (ab_decode.py's syntax)")
    ap.add_argument("--chunks", default="64", help="comma-separated prefill chunk sizes, each variant at each")
    ap.add_argument("--profile", action="store_true", help="GPU: each engine's prefill kernels by time")
    a = ap.parse_args()
    xla_options.configure()
    variants = [parse_variant(v) for v in a.variants.split(";") if v.strip()]
    p = load_preset(a.preset)
    if a.layers:
        p = with_layers(p, a.layers)
    cfg = preset_config(p)
    chunks = [int(c) for c in a.chunks.split(",") if c]
    ctx = a.tokens + max(chunks)
    keep = max(layout_keep_free(cfg, ctx, c) for c in chunks)  # one engine's state lives at a time
    w = jax.block_until_ready(random_weights(cfg, p, expert_layout="nib", keep_free=keep))
    card = jax.devices()[0].device_kind
    engines = {}
    for v, chunk in ((v, c) for c in chunks for v in variants):
        label = v.label if len(chunks) == 1 else f"{v.label}@{chunk}"
        eng = Engine(types.SimpleNamespace(config=cfg), ctx=ctx, chunk=chunk, weights=w, compiler_options=v.xla)
        t0 = time.perf_counter()
        with traced_under(v):
            eng.compile(["prefill"])
        print(f"{label}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        engines[label] = eng
    ids = np.random.default_rng(0).integers(0, cfg.n_vocab, a.tokens).tolist()
    params, key = SamplingParams(temperature=0.0).arrays(), jax.random.key(0)
    times = {label: [] for label in engines}
    prints = {}
    for _ in range(a.rounds):
        for label, eng in engines.items():
            state = eng.new_state()
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            tok, logits, state = eng.prefill(state, ids, params, key)
            int(tok)
            times[label].append(time.perf_counter() - t0)
            prints[label] = fingerprint((state, logits))
    for label, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{card}, {cfg.n_layer} layers, {a.tokens} tokens: {label}: {a.tokens / med:.1f} tokens/s "
            f"(median {med * 1e3:.1f} ms, {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}), print {prints[label]:#018x}",
            flush=True,
        )

    if a.profile:
        for label, eng in engines.items():
            profile(label, eng, ids, params, key, a.tokens)


def profile(label, eng, ids, params, key, n_tokens, top: int = 15) -> None:
    """One prefill of ``ids`` under the profiler: its kernels' time a token by kind and by name."""

    def run():
        return eng.prefill(eng.new_state(), ids, params, key)[0]

    total, by = devtime.trace_calls(run, 1)
    if not total:
        print(f"{label}: no GPU kernels traced")
        return
    print(f"{label}: {total / 1e6:.1f} ms of kernels for {n_tokens} tokens ({total / 1e3 / n_tokens:.1f} µs a token)")
    devtime.class_report(by, 1, top)  # the whole prefill's kernels
    sources = {}  # the layered prefill's programs may repeat a fusion's name: the last one's source
    for name in eng.program_names("prefill"):
        sources.update(devtime.hlo_sources(eng.program(name).as_text()))
    devtime.by_source(by, sources, 1, top=top)


if __name__ == "__main__":
    main()
