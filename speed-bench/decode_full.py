"""Decode tokens/s of a full-size model with random weights made on the GPU (no GGUF needed).

    python speed-bench/decode_full.py [--preset flash-q2] [--layers 43] [--ctx 4096] [--fill 512]
                                      [--steps 64] [--modes auto,off] [--out DIR]

Builds the preset's weights pytree at full size with random contents on the device
(``ds4jax.random_weights``: the loader's layout, so the engine's own compiled programs run on
it), fills the KV state with ``--fill`` random prompt tokens by chunked prefill, then times
``--steps`` greedy decode steps back to back (each step one compiled program, the next token
fed back on the device, one sync at the end): that is tokens/s as a user sees it. Then the
profiler traces a few steps for the device time per token (Σ kernel durations), the kernels
per step and where the time goes. Bandwidth is the weight bytes one step reads
(``random_weights.bytes_per_token``: dense tensors whole, 6 of 256 routed experts) times
tokens/s, against torch's device copy measured in the same run. The whole q2 model (81 GB)
needs an H200; ``--layers N`` keeps the first N blocks (N = 4 covers every kind of layer:
two uncompressed, one ratio-4 with the indexer, one ratio-128), which fits an H100.

Rows go to ``decode.csv``. Off GPU (``JAX_PLATFORMS=cpu``, e.g. ``--preset tiny``) it checks
that the script runs and reports wall-clock only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import devtime  # speed-bench/devtime.py, beside this script

from ds4jax import xla_options
from ds4jax.engine import Engine
from ds4jax.errors import DS4Error
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.random_weights import bytes_per_token, random_weights
from ds4jax.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-q2")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N blocks (0: all)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--fill", type=int, default=512, help="prompt tokens prefilled before timing")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--modes", default="auto,off", help="DS4JAX_KERNELS values to time")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--note", default="", help="free text for the CSV row (what this run changes)")
    ap.add_argument("--expert_layout", default="gguf", help="gguf, or nib: IQ2_XXS gate/up experts as nibbles")
    ap.add_argument("--top", type=int, default=12, help="kernels listed by device time")
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="GPU idle time by the kernel that follows, and the host's runtime calls a step",
    )
    ap.add_argument("--hlo", action="store_true", help="write the compiled decode program's HLO (gzip) beside the CSV")
    a = ap.parse_args()
    xla_options.configure()  # the engine's XLA runtime options (the CLI's), unless XLA_FLAGS sets them
    on_gpu = jax.default_backend() == "gpu"
    card = jax.devices()[0].device_kind
    p = load_preset(a.preset)
    if a.layers:
        p = with_layers(p, a.layers)
    cfg = preset_config(p)
    copy_bw = 0.0
    if on_gpu:
        from kernels import copy_bandwidth  # speed-bench/kernels.py

        copy_bw = copy_bandwidth()
    t0 = time.perf_counter()
    weights = jax.block_until_ready(random_weights(cfg, p, expert_layout=a.expert_layout))
    if a.expert_layout != "gguf":
        a.note = f"{a.note} [experts {a.expert_layout}]".strip()
    nbytes = bytes_per_token(weights, cfg)
    print(
        f"{card}: {p.name}, {cfg.n_layer} layers, random weights made in {time.perf_counter() - t0:.1f} s; "
        f"{nbytes / 1e9:.2f} GB of weights read per token; torch device copy {copy_bw / 1e12:.2f} TB/s",
        flush=True,
    )
    header = ["card", "preset", "layers", "ctx", "fill", "mode", "compile_s", "tok_s", "ms_per_tok"]
    header += ["device_ms_per_tok", "kernels_per_tok", "gb_per_tok", "gbps", "pct_copy", "finite", "xla_flags", "note"]
    with devtime.csv_rows(a.out, "decode.csv", header) as write:
        for mode in a.modes.split(","):
            os.environ["DS4JAX_KERNELS"] = mode
            row = run_mode(a, cfg, weights, nbytes, copy_bw, on_gpu)
            write([card, p.name, cfg.n_layer, a.ctx, a.fill, mode, *row, os.environ.get("XLA_FLAGS", ""), a.note])


def run_mode(a, cfg, weights, nbytes, copy_bw, on_gpu):
    # The engine needs only the config of a model file; the weights come from random_weights.
    eng = Engine(types.SimpleNamespace(config=cfg), ctx=a.ctx, chunk=64, weights=weights)
    mode = os.environ["DS4JAX_KERNELS"]
    names = ["decode"] + (["prefill"] if a.fill else [])
    t0 = time.perf_counter()
    eng.compile(names)  # side by side
    compile_s = time.perf_counter() - t0  # wall time: what a user waits
    hlo = eng.program("decode").as_text() if a.hlo or a.timeline else ""  # once: it is large at 43 layers
    if a.hlo:  # which model op each fusion in the profile is (its metadata names the source line)
        import gzip

        with gzip.open(os.path.join(a.out, f"decode_{mode}.hlo.gz"), "wt") as f:
            f.write(hlo)
    if a.timeline:
        devtime.entry_summary(hlo)
    for name in names:  # the programs' scratch beside the weights and state
        for part in eng.program_names(name):  # the layered prefill: one program a kind of block
            m = eng.program(part).memory_analysis()
            if m is not None:
                took = f"compiled in {eng.compile_s[part]:.1f} s, " if part in eng.compile_s else ""
                print(f"  [{mode}] {part}: {took}{m.temp_size_in_bytes / 1e9:.2f} GB temporaries", flush=True)
    params = SamplingParams(temperature=0.0).arrays()
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    state = eng.new_state()
    if a.fill:
        tok, _, state = eng.prefill(state, rng.integers(0, cfg.n_vocab, a.fill), params, key)
    else:
        tok = jnp.int32(1)
    box = {"state": state, "tok": tok}

    def step():
        box["tok"], box["logits"], box["state"] = eng.decode(box["state"], box["tok"], params, key)
        return box["tok"]

    for _ in range(2):  # warm
        step()
    jax.block_until_ready(box["tok"])
    t0 = time.perf_counter()
    host = []  # time in the calls themselves: dispatch is asynchronous, so a host-bound step
    for _ in range(a.steps):  # spends about its whole wall time here, a GPU-bound one far less
        t1 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t1)
    jax.block_until_ready(box["tok"])
    wall = (time.perf_counter() - t0) / a.steps
    h = np.array(host) * 1e3
    print(
        f"  [{mode}] host time in the decode call: {h.mean():.2f} ms a step of {wall * 1e3:.2f} ms wall "
        f"(per call: min {h.min():.2f}, median {np.median(h):.2f}, max {h.max():.2f})",
        flush=True,
    )
    finite = bool(np.isfinite(np.asarray(box["logits"])).all())
    dev_ms, per_tok = float("nan"), float("nan")
    if on_gpu:
        n = 8
        ns, by = devtime.trace_calls(step, n, devtime.classify if a.timeline else None)
        dev_ms, per_tok = ns / n / 1e6, sum(c for c, _ in by.values()) / n
        print(f"  [{mode}] device time per token by class:", flush=True)
        devtime.class_report(by, n, a.top)
        if a.hlo:  # the same kernels summed by the model line that made them
            devtime.by_source(by, devtime.hlo_sources(hlo), n, top=a.top)
    tok_s = 1.0 / wall
    gbps = nbytes * tok_s / 1e9
    pct = 100 * gbps * 1e9 / copy_bw if copy_bw else float("nan")
    print(
        f"  [{mode}] compile {compile_s:.1f} s; {tok_s:.1f} tokens/s ({wall * 1e3:.2f} ms/token, device "
        f"{dev_ms:.2f} ms, {per_tok:.0f} kernels); {gbps:.0f} GB/s = {pct:.1f} % of copy; finite logits: {finite}",
        flush=True,
    )
    return [
        f"{compile_s:.1f}",
        f"{tok_s:.2f}",
        f"{wall * 1e3:.3f}",
        f"{dev_ms:.3f}",
        f"{per_tok:.0f}",
        f"{nbytes / 1e9:.3f}",
        f"{gbps:.0f}",
        f"{pct:.1f}",
        finite,
    ]


if __name__ == "__main__":
    try:
        main()
    except DS4Error as e:  # a bad preset or --layers: one line, not a traceback
        sys.exit(f"decode_full: {e}")
