"""Check and time the Pallas kernels against their XLA references at DeepSeek V4 Flash shapes.

    python speed-bench/kernels.py [--out DIR] [--minutes 8] [--only q8_0,q8_0_quant,q8_0_mosaic,q8_0_launch,q8_0_rows,experts,experts_quant,norms,norm_quant,hc_pre,hc_post,quantize,attention,compressor_pool,compressor_row,float_dense] [--quick]

One run builds, checks and times every kernel inside jit:
* check: the kernel's output equals the jnp reference bit for bit on fresh random data
  (outputs are never pre-zeroed: an unwritten tile shows as a mismatch), and a token's row
  is the same at N = 1, 2, 4;
* time: a ``fori_loop`` whose step i calls the kernel once on weight copy i % C (C copies
  together exceed the L2 four times, so no call is served from cache; one call site,
  because each Pallas call site is one Triton compile). Routed experts use fresh expert
  ids every step. The XLA reference is timed the same way (C unrolled call sites, C ≤ 16).
The ceiling is torch's device-to-device copy measured in the same run (bytes read +
written). Rows go to ``kernels.csv`` (best variant per kernel/shape/N:
card,kernel,n_tok,shape,us,gbps,pct_copy,ref_us) and ``variants.csv`` (every variant) as
they are measured, so a run cut short keeps what it measured. Base configurations of every
shape come first, the variant sweep after, within --minutes.

Off GPU (``JAX_PLATFORMS=cpu``) it is a smoke test of itself: small shapes, kernels interpreted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import devtime

from ds4jax.model import attention as model_attention
from ds4jax.model import compressor as model_compressor
from ds4jax.model import hc
from ds4jax.model.numerics import fp4_e2m1_round_trip, fp8_e4m3_head, quantize_q8_0, quantize_q8_k, rms_norm
from ds4jax.model.numerics import hadamard as hadamard_ref
from ds4jax.quant.formats import QType
from ds4jax.quant.planes import QTensor
from ds4jax.state import window_slots
from pallas_kernels import (
    attention,
    compressor_pool,
    compressor_row,
    experts,
    float_dense,
    hc_post,
    hc_pre,
    norms,
    q8_0,
    q8_0_mosaic,
    q8_0_rows,
    quantize,
    sinkhorn,
)
from pallas_kernels.common import TileConfig, finished, matrix_columns
from pallas_kernels.testing import expert_planes

L2_BYTES = 50 << 20
INTERPRET = False

Q8_SHAPES = [  # name, out, k, groups (k per group)
    ("attn_kv 4096->512", 512, 4096, 1),
    ("attn_q_a 4096->1024", 1024, 4096, 1),
    ("shexp_up 4096->2048", 2048, 4096, 1),
    ("shexp_down 2048->4096", 4096, 2048, 1),
    ("mtp_e_proj 4096->4096", 4096, 4096, 1),
    ("attn_q_b 1024->32768", 32768, 1024, 1),
    ("attn_output_a 8x4096->1024", 8192, 4096, 8),
    ("attn_output_b 8192->4096", 4096, 8192, 1),
    ("output 4096->129280", 129280, 4096, 1),
]
EXPERT_SHAPES = [  # name, qtype, out, n (256 experts, 6 routed per token)
    ("gate/up IQ2_XXS 4096->2048", experts.IQ2_XXS, 2048, 4096),
    ("gate/up IQ2_XXS as nibbles 4096->2048", experts.IQ2_NIB, 2048, 4096),  # 2.1x the bytes
    ("down Q2_K 2048->4096", experts.Q2_K, 4096, 2048),
    ("gate/up Q4_K 4096->2048", experts.Q4_K, 2048, 4096),
    ("down Q4_K 2048->4096", experts.Q4_K, 4096, 2048),
]
N_EXPERT, N_USED, EXPERT_ROUNDS = 256, 6, 200
TOKENS = (1, 2, 4)


class Recorder:
    """Appends result rows to the two CSV files as they come (and keeps them for the table)."""

    def __init__(self, out_dir: str, card: str, copy_bw: float):
        self.card, self.copy_bw, self.rows = card, copy_bw, []
        self.best_f = open(os.path.join(out_dir, "kernels.csv"), "w", newline="")  # noqa: SIM115  (open for the run)
        self.var_f = open(os.path.join(out_dir, "variants.csv"), "w", newline="")  # noqa: SIM115
        self.best_w, self.var_w = csv.writer(self.best_f), csv.writer(self.var_f)
        self.best_w.writerow(["card", "kernel", "n_tok", "shape", "us", "gbps", "pct_copy", "ref_us"])
        self.var_w.writerow(["card", "kernel", "n_tok", "shape", "config", "exact", "us", "gbps", "ref_us"])

    def variant(self, kernel, n_tok, shape, config, ok, s, nbytes, ref_s):
        gbps = nbytes / max(s, 1e-12) / 1e9
        self.var_w.writerow(
            [self.card, kernel, n_tok, shape, config, ok, f"{s * 1e6:.2f}", f"{gbps:.0f}", f"{ref_s * 1e6:.2f}"]
        )
        self.var_f.flush()
        print(
            f"  {kernel:8s} {shape:28s} N={n_tok} {config:28s} {s * 1e6:9.2f} us {gbps:6.0f} GB/s "
            f"exact={ok} (xla {ref_s * 1e6:.2f} us)",
            flush=True,
        )

    def best(self, kernel, n_tok, shape, s, nbytes, ref_s):
        gbps = nbytes / max(s, 1e-12) / 1e9
        row = [
            self.card,
            kernel,
            n_tok,
            shape,
            f"{s * 1e6:.2f}",
            f"{gbps:.0f}",
            f"{100 * gbps * 1e9 / self.copy_bw:.1f}",
            f"{ref_s * 1e6:.2f}",
        ]
        self.best_w.writerow(row)
        self.best_f.flush()
        self.rows.append(row)


_TORCH_COPY = """
import numpy as np, torch
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda")
b = torch.empty_like(a)
a.random_(0, 255)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
ts = []
for _ in range(20):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    ts.append(e0.elapsed_time(e1) / 1e3)
print(2 * n / float(np.median(ts)))
"""


def copy_bandwidth() -> float:
    """torch's device copy, bytes read + written per second (the ceiling to quote). Measured in a
    child process: once torch had run in the bench's own process, the engine's decode step ran
    slower (session 13, H200, one process: 8 layers 2.93 -> 3.25 ms a token); and the 43-layer step
    measured 41.4 ms with torch in the process (host-bound) against 16.6 ms in a process without
    it (one sample each, so the cause there is not proven)."""
    out = subprocess.run([sys.executable, "-c", _TORCH_COPY], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"torch copy bandwidth: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.split()[-1])


def time_steps(fn, steps: int, *args, show: bool = False, prep=None, only: str | None = None):
    """(device seconds per call, fn(steps - 1, *args)) with fn(i, *args) called for i < steps in
    one fori_loop; the time is the calls' kernel durations from the profiler (devtime.py), less
    those of ``prep(i)`` (the bench's own per-step index, which fn computes the same way);
    ``only``: the durations of the kernels so named alone (``devtime.per_call``)."""
    s, last = devtime.per_call(fn, steps, *args, show=show, prep=prep, only=only)
    return s, np.asarray(last)


def time_xla_copies(fn, copies, rounds: int, show: bool = False, only: str | None = None) -> float:
    """Device seconds per call of an XLA function, called on C weight copies (unrolled) per step;
    ``only``: the kernels so named alone (``devtime.per_call``)."""
    s, _ = devtime.per_call(lambda i, copies: tuple(fn(*c) for c in copies), rounds, copies, show=show, only=only)
    return s / len(copies)


# ---- Q8_0 ---------------------------------------------------------------------------------
def q8_case(key, n_tok, out, k, groups):
    ks = jax.random.split(key, 4)
    xq = jax.random.randint(ks[0], (n_tok, groups * k), -128, 128, jnp.int32).astype(jnp.int8)
    dx = jax.random.uniform(ks[1], (n_tok, groups * k // 32), jnp.float32, 1e-3, 1e-1)
    qs = jax.random.randint(ks[2], (out, k), -128, 128, jnp.int32).astype(jnp.int8)
    d = jax.random.uniform(ks[3], (out, k // 32), jnp.float32, 1e-4, 1e-2).astype(jnp.float16)
    return xq, dx, qs, d


def copy_index(C):
    """Step i's weight copy, as the [1] int32 operand the kernels take (``prep`` of time_steps)."""
    return lambda i: jnp.asarray(i % C, jnp.int32).reshape(1)


def q8_bytes(out, k, groups, n_tok):
    """Bytes one call moves: the Q8_0 weight (int8 + f16 scale per 32), the tokens' int8 + f32
    block scale, the f32 outputs."""
    return out * k + out * (k // 32) * 2 + n_tok * (groups * k * 5 // 4 + out * 4)


def sweep_shapes(only: str):
    """The Q8_0 shapes whose name contains one of the comma-separated parts, largest first."""
    keep = [(nm, o, k, g) for nm, o, k, g in Q8_SHAPES if not only or any(t in nm for t in only.split(","))]
    return sorted(keep, key=lambda t: -t[1] * t[2])


def bench_q8_rows(rec: Recorder, shapes, tokens=(64,), rounds: int = 20) -> None:
    """A prefill chunk's rows against Q8_0 weights (``q8_0_rows``, tensor cores) against the
    reference's integer einsum as XLA runs it (reductions), each on C weight copies unrolled; the
    kernel's launch checked bit for bit on one call."""
    for name, out, k, g in shapes:
        wbytes = q8_bytes(out, k, g, 0)
        C = max(1, min(8, -(-4 * L2_BYTES // wbytes)))
        for n in tokens:
            copies = [q8_case(kk, n, out, k, g) for kk in jax.random.split(jax.random.PRNGKey(n + out), C)]
            want = np.asarray(jax.jit(lambda *a, g=g: q8_0.reference(*a, groups=g))(*copies[0]))
            got = np.asarray(q8_0_rows.matmul(*copies[0], g, interpret=INTERPRET))
            ref_s = time_xla_copies(lambda *a, g=g: q8_0.reference(*a, groups=g), copies, rounds)
            s = time_xla_copies(lambda *a, g=g: q8_0_rows.matmul(*a, g, interpret=INTERPRET), copies, rounds)
            cfg = q8_0_rows.choose_config(n, out, k, g)
            label = f"rows r{cfg.block_rows} t{cfg.block_t} s{cfg.k_splits} w{cfg.num_warps} st{cfg.num_stages}"
            rec.variant("q8_0_rows", n, name, label, bool(np.array_equal(got, want)), s, q8_bytes(out, k, g, n), ref_s)


def q8_variants(out, k, groups, us=(4,)):
    """Launch-shape variants (v5 sweep): rows per program × K splits, for blocks per step U
    (U and the K split set the summation order; rows do not), keeping 128–2048 programs of
    ≥ 4 loop steps each; the base configuration excluded."""
    base = q8_0.choose_config(out, k, groups)
    nb, r = k // 32, out // groups
    vs = []
    for u in us:
        steps = nb // u
        for rows in (16, 32, 64, 128):
            if r % rows:
                continue
            for splits in (1, 2, 4, 8, 16, 32):
                if steps % splits or steps // splits < 4 or not 128 <= out // rows * splits <= 2048:
                    continue
                vs.append(TileConfig(block_rows=rows, k_splits=splits, blocks_per_step=u))
    return [v for v in vs if v != base]


def tunings(cfg, stages):
    """Around a winning configuration (a Q8_0 TileConfig or an ExpertConfig): the knobs that keep
    the bits, pipeline stages and warps."""
    return [dataclasses.replace(cfg, num_stages=st) for st in stages] + [
        dataclasses.replace(cfg, num_warps=w) for w in (2, 8)
    ]


def expert_inputs(key, pairs, n, n_expert):
    """Q8_K activations xq [pairs, n], dx [pairs, n/256] and distinct expert ids [pairs]."""
    xq = jax.random.randint(key, (pairs, n), -128, 128, jnp.int32).astype(jnp.int8)
    dx = jax.random.uniform(key, (pairs, n // 256), jnp.float32, 1e-3, 1e-1)
    return xq, dx, jnp.arange(pairs, dtype=jnp.int32) * 37 % n_expert


CORES_TAG = " cores1"  # how the CSVs mark session 18's CUDA-core form of a Q8_0 launch
RAW_TAG = " raw"  # the launch's own kernel, its K-split partials unfinished (``Q8Bench.run(raw=True)``)


def own_kernels(raw: bool, prefix: str) -> str | None:
    """``time_steps``'s ``only`` for a ``raw`` run: the kernels named ``prefix…`` (none interpreted)."""
    return prefix if raw and not INTERPRET else None


def q8_label(cfg) -> str:
    """A Q8_0 launch configuration as the CSVs name it."""
    label = f"r{cfg.block_rows} s{cfg.k_splits} U{cfg.blocks_per_step} w{cfg.num_warps} st{cfg.num_stages}"
    return label + CORES_TAG * cfg.cores + (f" V{cfg.unroll}" if cfg.unroll > 1 else "")


class Q8Bench:
    def __init__(self, rec: Recorder):
        self.rec = rec
        self.cases = {}
        self.repacked = {}  # shape -> the Mosaic kernel's planes of the weight copies
        self.best: dict = {}  # (shape, N) -> (seconds, cfg, bytes, XLA seconds)
        self.best_raw: dict = {}  # the same for the launches' own kernels (``run(raw=True)``)
        self.best_mosaic: dict = {}  # the same for the Mosaic variant
        self.shown = set()  # a shape's first run prints its kernels (what the profiler counted)
        self.quant_refs: dict = {}  # (shape, N) -> (expected, XLA seconds) of the f32-input call
        self.best_quant: dict = {}

    def _case(self, name, out, k, groups):
        if name not in self.cases:
            wbytes = q8_bytes(out, k, groups, 0)
            C = max(1, min(32, -(-4 * L2_BYTES // wbytes)))
            keys = jax.random.split(jax.random.PRNGKey(len(self.cases)), C)
            copies = [q8_case(kk, 4, out, k, groups) for kk in keys]
            stacks = (jnp.stack([c[2] for c in copies]), jnp.stack([c[3] for c in copies]))
            rounds = max(3, min(50, int(2e9 // (wbytes * C))))
            refs = {}
            for n in TOKENS:
                cs = [(x[:n], dx[:n], qs, d) for x, dx, qs, d in copies[:16]]
                # the timed loop's last call (i = rounds*C - 1) reads copy C-1 with copy 0's tokens
                last = (copies[0][0][:n], copies[0][1][:n], copies[-1][2], copies[-1][3])
                want = np.asarray(jax.jit(lambda *a, g=groups: q8_0.reference(*a, groups=g))(*last))
                ref_s = time_xla_copies(
                    lambda *a, g=groups: q8_0.reference(*a, groups=g), cs, rounds, show=not self.cases
                )
                refs[n] = (want, ref_s)
            self.cases[name] = (copies, stacks, C, rounds, refs, {})
        return self.cases[name]

    def run_quantizing(self, name, out, k, groups, n_tok, cfg):
        """The kernel on f32 activations, quantizing them itself (``dx=None``), against XLA's
        quantization + reference matmul: the engine's whole Q8_0 call either way."""
        copies, stacks, C, rounds, _, _ = self._case(name, out, k, groups)
        x = jax.random.normal(jax.random.PRNGKey(3), (4, groups * k), jnp.float32)[:n_tok] * 3

        def ref(x, qs, d):
            return q8_0.reference(*quantize_q8_0(x), qs, d, groups)

        if (name, n_tok) not in self.quant_refs:
            want = np.asarray(jax.jit(ref)(x, copies[-1][2], copies[-1][3]))  # the loop's last call: copy C-1
            ref_s = time_xla_copies(ref, [(x, c[2], c[3]) for c in copies[:16]], rounds)
            self.quant_refs[(name, n_tok)] = (want, ref_s)
        want, ref_s = self.quant_refs[(name, n_tok)]

        def fn(i, x, qs, d, cfg=cfg):
            return q8_0.matmul(x, None, qs, d, groups=groups, cfg=cfg, interpret=INTERPRET, mat=mat_at(i))

        mat_at = copy_index(C)
        config = q8_label(cfg)
        try:
            s, got = time_steps(fn, rounds * C, x, *stacks, prep=mat_at)
        except Exception as e:  # noqa: BLE001  (a variant that does not build is reported, not fatal)
            print(f"  q8_0_quant {name} N={n_tok} {config}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
        ok = bool(np.array_equal(got, want))
        nbytes = q8_bytes(out, k, groups, n_tok) + n_tok * groups * k * 3  # f32 x in, not int8 + scales
        self.rec.variant("q8_0_quant", n_tok, name, config, ok, s, nbytes, ref_s)
        if ok:
            self.best_quant[(name, n_tok)] = (s, cfg, nbytes, ref_s)

    def run(self, name, out, k, groups, n_tok, cfg, raw: bool = False):
        """One launch timed and checked; ``raw``: the launch alone, as the engine's ``split=``
        callers run it: its K-split partials left for the kernel that reads them (which adds them
        as it loads: ``hc_post``, the quantize launch), finished outside the timed loop for the
        check, and the time that of the launch's own kernel (no finish, none of the bench's
        index arithmetic: ``devtime.per_call(only=)``)."""
        copies, stacks, C, rounds, refs, rows1 = self._case(name, out, k, groups)
        xq, dx = copies[0][0][:n_tok], copies[0][1][:n_tok]
        want, ref_s = refs[n_tok]

        def fn(i, xq, dx, qs, d, cfg=cfg):
            y = q8_0.matmul(xq, dx, qs, d, groups=groups, cfg=cfg, interpret=INTERPRET, mat=mat_at(i), raw=raw)
            return y.arrays if raw else y

        mat_at = copy_index(C)
        only = own_kernels(raw, "q8_0_share")
        try:
            s, got = time_steps(fn, rounds * C, xq, dx, *stacks, show=name not in self.shown, prep=mat_at, only=only)
            self.shown.add(name)
        except Exception as e:  # noqa: BLE001  (a variant that does not build is reported, not fatal)
            print(f"  q8_0 {name} N={n_tok} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
        if raw:
            got = np.asarray(finished(tuple(jnp.asarray(a) for a in got)))[:n_tok]
        ok = bool(np.array_equal(got, want))
        order = (cfg.k_splits, cfg.blocks_per_step)
        if n_tok == 1:
            rows1[order] = got[0]
        elif order in rows1 and not np.array_equal(got[0], rows1[order]):
            print(f"    N={n_tok}: row 0 differs from N=1", flush=True)
            ok = False
        nbytes = q8_bytes(out, k, groups, n_tok)
        config = q8_label(cfg) + RAW_TAG * raw
        self.rec.variant("q8_0", n_tok, name, config, ok, s, nbytes, ref_s)
        key = (name, n_tok)
        best = self.best_raw if raw else self.best
        if ok and (key not in best or s < best[key][0]):
            best[key] = (s, cfg, nbytes, ref_s)

    def run_mosaic(self, name, out, k, groups, n_tok, mcfg):
        """The Mosaic GPU variant on the same copies (repacked once, outside the timing)."""
        if not q8_0_mosaic.supported(out, k, groups, mcfg):
            return
        copies, stacks, C, rounds, refs, _ = self._case(name, out, k, groups)
        if name not in self.repacked:
            self.repacked[name] = q8_0_mosaic.repack(*stacks)
        qb, dT = self.repacked[name]
        xq, dx = copies[0][0][:n_tok], copies[0][1][:n_tok]
        want, ref_s = refs[n_tok]

        def fn(i, xq, dx, qb, dT):
            return q8_0_mosaic.matmul(xq, dx, qb, dT, groups, mcfg, INTERPRET, mat=mat_at(i))

        mat_at = copy_index(C)
        config = f"r{mcfg.block_rows} U{mcfg.blocks_per_step} st{mcfg.stages}"
        try:
            s, got = time_steps(fn, rounds * C, xq, dx, qb, dT, prep=mat_at)
        except Exception as e:  # noqa: BLE001  (a variant that does not build is reported, not fatal)
            print(f"  q8_0_mosaic {name} N={n_tok} {config}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
            return
        ok = bool(np.array_equal(got, want))
        nbytes = q8_bytes(out, k, groups, n_tok)
        self.rec.variant("q8_0_mosaic", n_tok, name, config, ok, s, nbytes, ref_s)
        key = (name, n_tok)
        if ok and (key not in self.best_mosaic or s < self.best_mosaic[key][0]):
            self.best_mosaic[key] = (s, mcfg, nbytes, ref_s)


# One launch as the engine makes it: no weight stack (so no selector load in the kernel), one or
# several matrices of one input. Name, the matrices' rows, K.
LAUNCH_SHAPES = [
    ("shexp_up 4096->2048", (2048,), 4096),
    ("shexp gate+up 4096->2x2048", (2048, 2048), 4096),
    ("mtp_e_proj 4096->4096", (4096,), 4096),
    ("attn_q_a+attn_kv 4096->1024+512", (1024, 512), 4096),
    ("attn_q_b 1024->32768", (32768,), 1024),
    ("attn_output_b 8192->4096", (4096,), 8192),
]


class Q8Launch:
    """The kernel timed on C separate weight copies per loop step (C call sites, unrolled): what
    the engine launches, without the stack index the other Q8_0 rows carry; and a read floor,
    XLA's int8 row sum of the same bytes (a pure read in one launch: what a launch of that size
    cost here at the least, not a bound for every possible kernel)."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.cases: dict = {}  # (outs, k) -> (copies, loop steps): made once for every N and the floor

    def _case(self, outs, k):
        if (outs, k) not in self.cases:
            wbytes = q8_bytes(sum(outs), k, 1, 0)
            C = max(2, min(16, -(-3 * L2_BYTES // (2 * wbytes))))  # ≥ 1.5 L2 a loop step
            keys = jax.random.split(jax.random.PRNGKey(11), C * len(outs))
            mats = [q8_case(kk, 1, o, k, 1)[2:] for kk, o in zip(keys, outs * C)]
            copies = [tuple(zip(*mats[c * len(outs) : (c + 1) * len(outs)])) for c in range(C)]
            self.cases[outs, k] = copies, max(3, min(50, int(2e9 // (wbytes * C))))
        return self.cases[outs, k]

    def run(self, name, outs, k, n_tok, cores=False, raw=False):
        """One launch over the matrices ``outs`` of one K; ``raw``: its own kernel's time, the
        K-split partials left for their reader (``Q8Bench.run``'s ``raw``)."""
        copies, rounds = self._case(outs, k)
        xq, dx = q8_case(jax.random.PRNGKey(5), n_tok, 16, k, 1)[:2]

        def kern(qs, d):  # tuples of planes: one launch for all (a 1-tuple is the one-matrix launch)
            y = q8_0.matmul(xq, dx, qs, d, interpret=INTERPRET, cores=cores, raw=raw)
            return y[0].arrays if raw else y

        def ref(qs, d):
            return tuple(q8_0.reference(xq, dx, q, dd) for q, dd in zip(qs, d))

        got, want = jax.jit(kern)(*copies[-1]), jax.jit(ref)(*copies[-1])
        if raw:  # the launch's partials finished here, its matrices' columns side by side
            y = np.asarray(finished(got))[:n_tok]
            got = tuple(y[:, start : start + o] for start, o in matrix_columns(outs))
        ok = all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))
        ref_s = time_xla_copies(ref, copies, rounds)
        s = time_xla_copies(kern, copies, rounds, show=n_tok == 1, only=own_kernels(raw, "q8_0_share"))
        cfg = q8_0.config_for(outs, k, cores=cores, n=n_tok)  # what matmul took
        config = (
            f"launch r{cfg.block_rows} s{cfg.k_splits} V{cfg.unroll} C{len(copies)}" + CORES_TAG * cores + RAW_TAG * raw
        )
        nbytes = q8_bytes(sum(outs), k, 1, n_tok)
        self.rec.variant("q8_0_launch", n_tok, name, config, ok, s, nbytes, ref_s)
        if ok:
            self.rec.best(f"q8_0 launch {'x'.join(map(str, outs))}{RAW_TAG * raw}", n_tok, name, s, nbytes, ref_s)

    def floor(self, name, outs, k):
        copies, rounds = self._case(outs, k)
        s = time_xla_copies(lambda qs, d: tuple(jnp.sum(q, axis=1, dtype=jnp.int32) for q in qs), copies, rounds)
        nbytes = sum(outs) * k
        self.rec.variant("read_floor", 0, name, f"xla int8 row sum C{len(copies)}", True, s, nbytes, s)
        self.rec.best("read floor (XLA int8 row sum)", 0, name, s, nbytes, s)


MOSAIC_CONFIGS = [
    q8_0_mosaic.MosaicConfig(64, 16, 3),
    q8_0_mosaic.MosaicConfig(64, 8, 4),
    q8_0_mosaic.MosaicConfig(128, 8, 3),
    q8_0_mosaic.MosaicConfig(64, 16, 2),
]


# ---- routed experts -------------------------------------------------------------------------
class ExpertBench:
    def __init__(self, rec: Recorder):
        self.rec, self.best, self.best_raw, self.cases = rec, {}, {}, {}

    def run(self, name, qtype, out, n, n_tok, cfg: experts.ExpertConfig, version=3, pair=False, quant=False, raw=False):
        """One configuration at N = n_tok; ``pair``: two matrices of the shape (gate and up) in one
        launch, against the two plain calls' references; ``quant``: f32 activations that the kernel
        quantizes itself, against XLA's Q8_K quantization + reference; ``raw``: the time is the
        expert kernels' own (``devtime.per_call(only=)``), none of the bench's around them."""
        if cfg.whole_k:  # the shape's own split (the summation grouping), only the launch changes
            cfg = dataclasses.replace(cfg, k_splits=experts.choose_config(qtype, out, n // 256).k_splits)
        if out % cfg.block_rows or (n // 256) % cfg.k_splits:
            return
        nb = n // 256
        if name not in self.cases:
            self.cases[name] = [expert_planes(jax.random.PRNGKey(len(self.cases)), qtype, N_EXPERT, out, nb)], {}
        mats, refs = self.cases[name]
        if pair and len(mats) == 1:  # a second matrix set: the pair's reads are as cold as the first's
            mats.append(expert_planes(jax.random.PRNGKey(50 + len(self.cases)), qtype, N_EXPERT, out, nb))
        use = tuple(mats[:2]) if pair else mats[0]
        label = name + " (gate+up, one launch)" * pair + " (f32 in, quantized in the kernel)" * quant
        P = n_tok * N_USED
        xq, dx, base = expert_inputs(jax.random.PRNGKey(100 + n_tok), P, n, N_EXPERT)
        if quant:
            xq, dx = jax.random.normal(jax.random.PRNGKey(200 + n_tok), (P, n), jnp.float32) * 2, None

        def ids_at(i):
            return (base + i * 101) % N_EXPERT  # fresh experts every call: nothing stays in L2

        if (n_tok, pair, quant) not in refs:

            def ref(i, xq, dx, use):
                if quant:
                    xq, dx = quantize_q8_k(xq)
                if pair:
                    return tuple(experts.reference(xq, dx, qtype, m, ids_at(i)) for m in use)
                return experts.reference(xq, dx, qtype, use, ids_at(i))

            # the check's reference is a plain call (XLA:CPU can round a reference inside a loop
            # differently: KERNELS.md, "numerics.rounded"); the loop gives only its time
            last = jnp.int32(EXPERT_ROUNDS - 1)
            want = np.asarray(jax.jit(ref)(last, xq, dx, use))
            refs[(n_tok, pair, quant)] = (time_steps(ref, EXPERT_ROUNDS, xq, dx, use)[0], want)
        ref_s, want = refs[(n_tok, pair, quant)]

        def fn(i, xq, dx, use):
            return experts.matmul(xq, dx, ids_at(i), qtype, use, cfg, INTERPRET, version)

        try:
            s, got = time_steps(fn, EXPERT_ROUNDS, xq, dx, use, prep=ids_at, only=own_kernels(raw, "experts_"))
        except Exception as e:  # noqa: BLE001  (a variant that does not build is reported, not fatal)
            print(
                f"  experts v{version} {label} N={n_tok} {expert_label(cfg)}: FAILED {type(e).__name__}: {str(e)[:300]}",
                flush=True,
            )
            return
        ok = bool(np.array_equal(got, want))
        per_expert = sum(int(np.prod(v.shape[1:])) * v.dtype.itemsize for v in mats[0].values())
        nbytes = P * ((1 + pair) * (per_expert + out * 4) + (4 * n if quant else n + nb * 4))
        self.rec.variant(
            "experts", n_tok, label, f"v{version} {expert_label(cfg)}" + RAW_TAG * raw, ok, s, nbytes, ref_s
        )
        key = (label, n_tok)
        best = self.best_raw if raw else self.best
        if ok and (key not in best or s < best[key][0]):
            best[key] = (s, (version, cfg), nbytes, ref_s)


def expert_label(cfg: experts.ExpertConfig) -> str:
    return f"r{cfg.block_rows}s{cfg.k_splits}w{cfg.num_warps}st{cfg.num_stages}" + "k" * cfg.whole_k


def expert_configs(spec: str) -> list:
    """``--expert-cfgs`` "r32s4w2,r64s4w4st1,r16s8w4k": launches to time beside each expert shape's base
    (rows r, K splits s, warps w, stages st, k: one program over the whole K; the splits set the
    summation grouping, the rest only time)."""
    out = []
    for item in filter(None, spec.split(",")):
        m = re.fullmatch(r"r(\d+)s(\d+)(?:w(\d+))?(?:st(\d+))?(k)?", item)
        if not m:
            raise SystemExit(f"--expert-cfgs: {item!r} is not rRsS[wW][stT][k]")
        *nums, whole = m.groups()
        rows, splits, warps, stages = (int(v) if v else None for v in nums)
        given = {"num_warps": warps, "num_stages": stages}  # the rest: ExpertConfig's defaults
        cfg = experts.ExpertConfig(rows, splits, **{k: v for k, v in given.items() if v is not None})
        out.append(dataclasses.replace(cfg, whole_k=bool(whole)))
    return out


def expert_variants(qtype, out, n):
    """K splits × rows (the splits set the summation grouping: one per shape in the engine);
    the base configuration excluded."""
    base, nb = experts.choose_config(qtype, out, n // 256), n // 256
    vs = []
    for splits in (1, 2, 4, 8):
        for rows in (32, 64, 128, 16):
            if nb % splits == 0 and out % rows == 0:
                vs.append(experts.ExpertConfig(block_rows=rows, k_splits=splits))
    return [v for v in vs if v != base]


def time_variant(rec: Recorder, kernel, n_tok, shape, config, fn, args, want, nbytes, ref_s, rounds):
    """Time fn(i, *args) in jit, check it against ``want`` and record the variant row: its seconds
    a call when exact, else None (a kernel that does not build is reported, not fatal)."""
    try:
        s, got = time_steps(fn, rounds, *args, show=n_tok == 1)
    except Exception as e:  # noqa: BLE001
        print(f"  {kernel} N={n_tok} {config}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    ok = bool(np.array_equal(got, want))
    rec.variant(kernel, n_tok, shape, config, ok, s, nbytes, ref_s)
    return s if ok else None


# ---- fused norms ------------------------------------------------------------------------------
def bench_norms(rec: Recorder, q_rank=1024, head_dim=512, n_head=64, n_rot=64, rounds=200):
    """The fused norms against XLA's chain of fusions (activations: L2-resident in both, as in a step)."""
    eps = 1e-6
    best = {}
    for n_tok in TOKENS:
        k = iter(jax.random.split(jax.random.PRNGKey(7 + n_tok), 8))
        q = jax.random.normal(next(k), (n_tok, n_head, head_dim))
        ang = jax.random.uniform(next(k), (n_tok, n_rot // 2), jnp.float32, 0, 6)
        cases = []
        for hpp in (16, 4, 1):  # heads per program: 16 (the default) left 4 programs a token (run 6)
            cases.append(
                (
                    "head_norm_rope",
                    f"q {n_head}x{head_dim}",
                    (q, jnp.cos(ang), jnp.sin(ang)),
                    lambda i, q, c, s, hpp=hpp: norms.head_norm_rope(
                        q, c, s, eps, heads_per_program=hpp, interpret=INTERPRET
                    ),
                    lambda i, q, c, s: norms.head_norm_rope_reference(q, c, s, eps),
                    q.size * 8 + ang.size * 8,
                    f"{hpp} heads a program",
                )
            )
        refs = {}
        for kernel, shape, args, fn, ref, nbytes, *config in cases:
            if kernel not in refs:
                refs[kernel] = (
                    time_steps(ref, rounds, *args, show=n_tok == 1)[0],
                    np.asarray(jax.jit(ref)(jnp.int32(rounds - 1), *args)),
                )
            ref_s, want = refs[kernel]
            s = time_variant(rec, kernel, n_tok, shape, "".join(config), fn, args, want, nbytes, ref_s, rounds)
            if s is not None and ((kernel, n_tok) not in best or s < best[(kernel, n_tok)][0]):
                best[(kernel, n_tok)] = (s, shape, nbytes, ref_s, "".join(config))
    for (kernel, n_tok), (s, shape, nbytes, ref_s, config) in best.items():
        rec.best(f"{kernel} {config}".strip(), n_tok, shape, s, nbytes, ref_s)


# ---- hyper-connection pre-mix ------------------------------------------------------------------
# (K slices, warps, stages, the squares' step) of the mixer launch; the first is the engine's
HC_VARIANTS = [(32, 8, 3, 4096), (64, 8, 3, 4096), (32, 8, 3, 16384), (64, 8, 3, 16384), (16, 8, 3, 4096)]
HC_GATE_COLUMNS = (4, 8, 16)  # the gates launch's programs a token (``hc_pre.GATE_COLUMNS``), beside the first


def _flat(outs):
    """Outputs (any pytree of arrays) as one f32 row: the timed loop's result, compared bit for bit."""
    return jnp.concatenate([a.astype(jnp.float32).reshape(-1) for a in jax.tree.leaves(outs)])


def hc_pre_inputs(key, n_tok, n_hc, n_embd):
    """(H [T, n, d], the mixer's f16 rows [n(n+2), n·d], scale [3], base [n(n+2)]) of a pre-mix."""
    R = n_hc * (n_hc + 2)
    k = iter(jax.random.split(key, 4))
    H = jax.random.normal(next(k), (n_tok, n_hc, n_embd)) * 2
    fn = (jax.random.normal(next(k), (R, n_hc * n_embd)) * 0.05).astype(jnp.float16)
    scale = jax.random.uniform(next(k), (3,), jnp.float32, 0.2, 2.0)
    return H, fn, scale, jax.random.normal(next(k), (R,))


def bench_hc_pre(rec: Recorder, n_hc=4, n_embd=4096, rounds=200, n_iter=20):
    """The pre-mix kernels (the mixer, the gates, the Sinkhorn) against the model's XLA path (its Sinkhorn on the kernel,
    as the engine runs it), K slices a token swept."""
    eps, R, F = 1e-6, n_hc * (n_hc + 2), n_hc * n_embd
    best = {}
    w = lambda fn: QTensor(int(QType.F16), fn.shape, {"w": fn})
    for n_tok in TOKENS:
        k = iter(jax.random.split(jax.random.PRNGKey(11 + n_tok), 2))
        args = hc_pre_inputs(next(k), n_tok, n_hc, n_embd)
        H, fn = args[:2]
        ref = lambda i, H, fn, s, b: _flat(hc._hc_pre(H, w(fn), s, b, n_iter, eps, eps))
        ref_s = time_steps(ref, rounds, *args, show=n_tok == 1)[0]
        want = np.asarray(jax.jit(ref)(jnp.int32(rounds - 1), *args))
        nbytes = fn.size * 2 + H.size * 4 * 2 + n_tok * (n_embd + n_hc + n_hc * n_hc) * 4
        shape = f"{n_hc}x{n_embd} mixer {R} rows"
        # then the engine's mixer launch with the gates launch in C programs a token along the columns
        gated = [(*HC_VARIANTS[0], c) for c in HC_GATE_COLUMNS]
        for splits, warps, stages, sq, *cols in [*HC_VARIANTS, *gated]:
            if F % (splits * hc_pre.MIX_CHUNK) or (INTERPRET and (splits, warps, stages, sq) != HC_VARIANTS[0]):
                continue
            gc = cols[0] if cols else 1
            knobs = {"splits": splits, "warps": warps, "stages": stages, "sq_chunk": sq, "gate_columns": gc}
            fn_k = lambda i, H, fn, s, b, knobs=knobs: _flat(
                hc_pre.hc_pre(H, fn, s, b, n_iter, eps, eps, **knobs, interpret=INTERPRET)
            )
            config = f"S{splits}w{warps}st{stages}" + f"sq{sq}" * (sq != hc_pre.SQ_CHUNK) + f"C{gc}" * bool(cols)
            t = time_variant(rec, "hc_pre", n_tok, shape, config, fn_k, args, want, nbytes, ref_s, rounds)
            if t is not None and (n_tok not in best or t < best[n_tok][0]):
                best[n_tok] = (t, config)
        c = jax.random.normal(next(k), (n_tok, n_hc, n_hc)) * 3  # the Sinkhorn kernel alone, both sum forms
        ref_c = lambda i, c: sinkhorn.reference(c, n_iter, eps)
        ref_cs, want_c = time_steps(ref_c, rounds, c)
        for sums in ("reduce", "chain"):
            fn_s = lambda i, c, sums=sums: sinkhorn.sinkhorn(c, n_iter, eps, sums=sums, interpret=INTERPRET)
            time_variant(rec, "sinkhorn", n_tok, f"{n_hc}x{n_hc}", sums, fn_s, (c,), want_c, c.size * 8, ref_cs, rounds)
        if n_tok in best:
            rec.best(f"hc_pre {best[n_tok][1]}", n_tok, shape, best[n_tok][0], nbytes, ref_s)


# (columns a program, warps) of the post-mix launch, and the mixer's K slices (0: the engine's);
# the first is the engine's
HC_POST_VARIANTS = [(64, 4, 0), (128, 4, 0), (64, 2, 0), (256, 4, 0), (64, 4, 64), (64, 4, 16), (64, 4, 128)]


def bench_hc_post(rec: Recorder, n_hc=4, n_embd=4096, rounds=200, n_iter=20):
    """A post-mix then the next pre-mix: the kernel that also sums the squares, then the pre-mix
    kernels reading them, against XLA's post-mix (two fusions) then the pre-mix kernels summing
    the squares themselves (the engine before session 22)."""
    eps, F = 1e-6, n_hc * n_embd
    pre = functools.partial(hc_pre.hc_pre, n_iter=n_iter, rms_eps=eps, hc_eps=eps, interpret=INTERPRET)
    for n_tok in TOKENS:
        k = iter(jax.random.split(jax.random.PRNGKey(21 + n_tok), 4))
        H, fn, scale, base = hc_pre_inputs(next(k), n_tok, n_hc, n_embd)
        y = jax.random.normal(next(k), (n_tok, n_embd))
        post = jax.random.uniform(next(k), (n_tok, n_hc), jnp.float32, 0.0, 2.0)
        comb = jax.random.uniform(next(k), (n_tok, n_hc, n_hc))
        args = (H, y, post, comb, fn, scale, base)

        def ref(i, H, y, p, c, fn, s, b):
            new = hc.hc_post(H, y, p, c)
            return _flat((new, *pre(new, fn, s, b)))

        ref_s = time_steps(ref, rounds, *args, show=n_tok == 1)[0]
        want = np.asarray(jax.jit(ref)(jnp.int32(rounds - 1), *args))
        nbytes = fn.size * 2 + H.size * 4 * 4 + n_tok * n_embd * 4  # H read twice, H' written and read
        shape = f"{n_hc}x{n_embd} post + pre"
        best = None
        for cols, warps, splits in HC_POST_VARIANTS:
            if cols > n_embd or (INTERPRET and (cols, warps, splits) != HC_POST_VARIANTS[0]):
                continue
            if splits and F % (splits * hc_pre.MIX_CHUNK):
                continue

            def fn_k(i, H, y, p, c, fn, s, b, cols=cols, warps=warps, splits=splits):
                new, sq = hc_post.hc_post(H, y, p, c, cols=cols, warps=warps, interpret=INTERPRET)
                return _flat((new, *pre(new, fn, s, b, squares=sq, splits=splits)))

            config = f"c{cols}w{warps}" + f"S{splits}" * bool(splits)
            t = time_variant(rec, "hc_post", n_tok, shape, config, fn_k, args, want, nbytes, ref_s, rounds)
            if t is not None and (best is None or t < best[0]):
                best = (t, config)
        if best:
            rec.best(f"hc_post {best[1]}", n_tok, shape, best[0], nbytes, ref_s)


# ---- the activations' quantization ----------------------------------------------------------
# (kind, what it feeds, rows a token, K) at full size
QUANT_SHAPES = [
    ("q8_0", "attn_q_a+kv / shexp gate+up in", 1, 4096),
    ("q8_0", "attn_q_b in", 1, 1024),
    ("q8_0", "attn_output_a in", 1, 32768),
    ("q8_0", "attn_output_b in", 1, 8192),
    ("q8_0", "shexp down in", 1, 2048),
    ("q8_k", "experts gate+up in", 1, 4096),
    ("q8_k", "experts down in", 6, 2048),
]
QUANT_VARIANTS = [(1024, 4), (512, 4), (2048, 4), (1024, 8)]  # (elements a program, warps); first: the engine's


def bench_quantize(rec: Recorder, rounds=200, shapes=QUANT_SHAPES):
    """The quantize launch against XLA's fusions of ``numerics.quantize_q8_0`` / ``quantize_q8_k``
    on a materialized x (in the model XLA also fuses x's producer into its first fusion)."""
    for n_tok in TOKENS:
        for kind, what, rows, K in shapes:
            x = jax.random.normal(jax.random.PRNGKey(K + n_tok), (n_tok * rows, K)) * 3
            ref, block = quantize.KINDS[kind]
            ref_s, want = time_steps(lambda i, x, ref=ref: _flat(ref(x)), rounds, x, show=n_tok == 1)
            nbytes = x.size * 4 + x.size + x.size * 4 // block
            best = None
            for chunk, warps in QUANT_VARIANTS:
                if INTERPRET and (chunk, warps) != QUANT_VARIANTS[0]:
                    continue

                def fn(i, x, kind=kind, chunk=chunk, warps=warps):
                    return _flat(quantize.quantize(x, kind, chunk=chunk, warps=warps, interpret=INTERPRET))

                config = f"c{chunk}w{warps}"
                t = time_variant(rec, f"quantize {kind}", n_tok, what, config, fn, (x,), want, nbytes, ref_s, rounds)
                if t is not None and (best is None or t < best[0]):
                    best = (t, config)
            if best:
                rec.best(f"quantize {kind} {best[1]}", n_tok, what, best[0], nbytes, ref_s)


# (programs a token, warps) of the norm + quantize launch
NORM_QUANT_VARIANTS = ((4, 4), (1, 4), (2, 4), (8, 4), (4, 8), (4, 2))


def bench_norm_quant(rec: Recorder, n_embd=4096, q_rank=1024, head_dim=512, rounds=200):
    """The RMS norms with their outputs' quantization in one launch (``norms.rms_norm_quant``)
    against what the model ran before: XLA's norm fusions, then the quantize launch per kind (all
    outputs flattened into one array on both sides, for the bits check)."""
    eps = 1e-6

    def before(parts):  # interpreted (the CPU smoke run), numerics' own functions
        q = (lambda y, k: quantize.KINDS[k][0](y)) if INTERPRET else (lambda y, k: quantize.quantize(y, k))
        return [(y, {k: q(y, k) for k in kinds}) for x, w, kinds in parts for y in (rms_norm(x, w, eps),)]

    for n_tok in TOKENS:
        k = iter(jax.random.split(jax.random.PRNGKey(11 + n_tok), 8))
        row = functools.partial(lambda n, k, t: jax.random.normal(next(k), (t, n)) * 3, k=k, t=n_tok)
        vec = functools.partial(lambda n, k: jax.random.normal(next(k), (n,)), k=k)
        cases = [
            ("attn_norm -> q8_0", ((row(n_embd), vec(n_embd), ("q8_0",)),)),
            ("q_a -> q8_0 + kv_a", ((row(q_rank), vec(q_rank), ("q8_0",)), (row(head_dim), vec(head_dim), ()))),
            ("ffn_norm -> q8_0 + q8_k", ((row(n_embd), vec(n_embd), ("q8_0", "q8_k")),)),
        ]
        for what, parts in cases:
            xs, ws = tuple(p[0] for p in parts), tuple(p[1] for p in parts)
            kinds = tuple(p[2] for p in parts)
            rebuild = lambda xs, ws, kinds=kinds: tuple(zip(xs, ws, kinds))
            ref = lambda i, xs, ws, rebuild=rebuild: _flat(before(rebuild(xs, ws)))
            ref_s, want = time_steps(ref, rounds, xs, ws, show=n_tok == 1)
            nbytes = sum(x.size * 9 + w.size * 4 + x.size * 5 * len(kd) for x, w, kd in parts)
            best = None
            for chunks, warps in NORM_QUANT_VARIANTS:
                if not norms.quant_supported(parts, chunks) or (
                    INTERPRET and (chunks, warps) != NORM_QUANT_VARIANTS[0]
                ):
                    continue

                def fn(i, xs, ws, chunks=chunks, warps=warps, rebuild=rebuild):
                    return _flat(
                        norms.rms_norm_quant(rebuild(xs, ws), eps, chunks=chunks, warps=warps, interpret=INTERPRET)
                    )

                config = f"c{chunks}w{warps}"
                t = time_variant(rec, "rms_norm_quant", n_tok, what, config, fn, (xs, ws), want, nbytes, ref_s, rounds)
                if t is not None and (best is None or t < best[0]):
                    best = (t, config)
            if best:
                rec.best(f"rms_norm_quant {best[1]}", n_tok, what, best[0], nbytes, ref_s)


# ---- decode attention ---------------------------------------------------------------------------
# (split (None: chosen from the key count), warps, stages, head-dim columns, loads a step ahead) of the
# attention kernels
ATTN_VARIANTS = (
    (None, 4, 2, 32, False),
    (None, 4, 2, 32, True),
    (None, 4, 3, 32, True),
    (None, 8, 2, 32, True),
    (8, 4, 2, 32, True),
    (4, 4, 2, 32, True),
)


ATTN_FULL = {"n_head": 64, "head_dim": 512, "window": 128, "top_k": 512, "n_comp": 1024}
ATTN_SMALL = {"n_head": 8, "head_dim": 128, "window": 16, "top_k": 32, "n_comp": 64}  # interpreted


def attention_inputs(key, n_tok, n_head, head_dim, window, top_k, n_comp, ratio=4):
    """(q, raw, raw_visible, second table, its rows or None, its visible, sink) of a decode step's
    attention: the raw window (90 % visible) and either the indexer's top-k rows read by index
    from ``n_comp`` compressed rows (ratio 4) or 32 shared compressed rows (ratio 128)."""
    k = iter(jax.random.split(key, 7))
    f16 = lambda *shape: jax.random.normal(next(k), shape).astype(jnp.float16)
    q = jax.random.normal(next(k), (n_tok, n_head, head_dim)) * 3
    raw = f16(window + n_tok, head_dim)
    raw_v = jax.random.uniform(next(k), (n_tok, window + n_tok)) < 0.9
    sink = jax.random.normal(next(k), (n_head,))
    if ratio == 4:
        second, rows = f16(n_comp, head_dim), jax.random.randint(next(k), (n_tok, top_k), 0, n_comp)
    else:
        second, rows = f16(32, head_dim), None
    return q, raw, raw_v, second, rows, jnp.ones((n_tok, top_k if ratio == 4 else 32), bool), sink


def bench_attention(rec: Recorder, rounds=200, **dims):
    """The attention kernels (scores, then the mix by key splits; XLA's max and epilogue) against
    the model's XLA path on ``attention_inputs`` (ratio-4 and ratio-128 layers at a 4096 context).
    Variants: ``ATTN_VARIANTS``."""
    scale = float(np.float32(1.0 / np.sqrt(dims["head_dim"])))
    for n_tok in TOKENS:
        for ratio in (4, 128):
            args = attention_inputs(jax.random.PRNGKey(21 + n_tok), n_tok, **dims, ratio=ratio)
            q, raw, _, second, rows, _, _ = args
            ref = lambda i, q, a, av, b, br, bv, s: model_attention.sink_attention(
                q, tuple(model_attention.f32_keys(((a, None, av), (b, br, bv)))), s, np.float32(scale)
            )
            ref_s, want = time_steps(ref, rounds, *args, show=n_tok == 1)
            nbytes = (raw.size + (rows.size * q.shape[-1] if rows is not None else second.size)) * 2 + q.size * 8
            shape = f"{q.shape[1]}x{q.shape[2]} ratio-{ratio}"
            best = None
            for split, warps, stages, dc, prefetch in ATTN_VARIANTS:
                knobs = {"split": split, "warps": warps, "stages": stages, "dc": dc, "prefetch": prefetch}
                fn = lambda i, q, a, av, b, br, bv, s, knobs=knobs: attention.sink_attention(
                    q, ((a, None, av), (b, br, bv)), s, scale, interpret=INTERPRET, **knobs
                )
                config = f"split{split or 'auto'}w{warps}st{stages}d{dc}" + "pf" * prefetch
                t = time_variant(rec, "attention", n_tok, shape, config, fn, args, want, nbytes, ref_s, rounds)
                if t is not None and (best is None or t < best[0]):
                    best = (t, config)
            if best is not None:
                rec.best(f"attention {best[1]}", n_tok, shape, best[0], nbytes, ref_s)


# (what, ratio, coff, head dim) of DeepSeek V4 Flash's compressors; decode pools one window slot
POOL_SHAPES = [("attn ratio-4", 4, 2, 512), ("indexer ratio-4", 4, 2, 128), ("attn ratio-128", 128, 1, 512)]
POOL_VARIANTS = [(None, 4), (64, 4), (128, 4), (None, 2), (None, 1)]  # (columns a program, warps); first: the engine's


def bench_compressor_pool(rec: Recorder, rounds=200, shapes=POOL_SHAPES):
    """A compressor's window pooling (``compressor_pool.pool``) against ``compressor._pool`` on
    XLA, at the slots a chunk of N tokens touches; scores of a partly filled window."""
    for n_tok in TOKENS:
        for what, ratio, coff, hd in shapes:
            n_slots = window_slots(ratio, n_tok)
            L = (coff - 1 + n_slots) * ratio
            k1, k2 = jax.random.split(jax.random.PRNGKey(31 + n_tok))
            kv = jax.random.normal(k1, (L, coff * hd))
            sc = jax.random.normal(k2, (L, coff * hd)) * 4.0
            sc = jnp.where(jnp.arange(L)[:, None] >= L - ratio // 2, -1e30, sc)  # the unfilled rows
            args = (kv, sc)
            dims = (ratio, coff, hd, n_slots)
            ref = lambda i, kv, sc, d=dims: model_compressor._pool(kv, sc, *d)
            ref_s, want = time_steps(ref, rounds, *args, show=n_tok == 1)
            nbytes = 2 * kv.size * 4 + n_slots * hd * 4
            shape = f"{what} {coff * hd} cols, {n_slots} slot(s)"
            best = None
            for cols, warps in POOL_VARIANTS:
                if (cols or 1) > hd or (INTERPRET and (cols, warps) != POOL_VARIANTS[0]):
                    continue
                fn = lambda i, kv, sc, d=dims, cols=cols, warps=warps: compressor_pool.pool(
                    kv, sc, *d, interpret=INTERPRET, cols=cols, warps=warps
                )
                config = f"c{cols or compressor_pool.cols_for(ratio, hd)}w{warps}"
                t = time_variant(rec, "compressor_pool", n_tok, shape, config, fn, args, want, nbytes, ref_s, rounds)
                if t is not None and (best is None or t < best[0]):
                    best = (t, config)
            if best is not None:
                rec.best(f"compressor_pool {best[1]}", n_tok, shape, best[0], nbytes, ref_s)


# (what, ratio, pos0) of a decode token: a window's last token (the row written) or not (skipped)
ROW_SHAPES = [
    ("ratio-4 complete", 4, 7),
    ("ratio-4 incomplete", 4, 5),
    ("ratio-128 complete", 128, 255),
    ("ratio-128 incomplete", 128, 250),
]


# (what, hd, n_rot, trip) of the full model's compressors: the attention's (FP8 head) and the indexer's
ROW_KINDS = [("attention", 512, 64, ("fp8", 448, 64)), ("indexer", 128, 64, ("fp4", 32))]


def bench_compressor_row(rec: Recorder, rounds=200, kinds=ROW_KINDS, cap=1041, shapes=ROW_SHAPES):
    """A compressor's rows into its cache (``compressor_row.rows_into_cache``) against XLA's tail
    (norm, tail RoPE, the FP8 head or the Hadamard and FP4, f16, the row's write) at decode (N=1).
    Both write into a cache that is not donated here, so both times include XLA's copy of the cache."""
    eps = 1e-6
    for kind, hd, n_rot, trip in kinds:
        if trip[0] == "fp8":
            fn_trip = lambda r, trip=trip: fp8_e4m3_head(r, trip[1], trip[2])
        else:
            fn_trip = lambda r, trip=trip: fp4_e2m1_round_trip(hadamard_ref(r), trip[1])
        k = iter(jax.random.split(jax.random.PRNGKey(41), 5))
        rows = jax.random.normal(next(k), (1, hd)) * 3.0
        w = jax.random.uniform(next(k), (hd,), jnp.float32, 0.5, 2.0)
        ang = jax.random.uniform(next(k), (4096, n_rot // 2), jnp.float32, 0, 6)
        cos, sin = jnp.cos(ang), jnp.sin(ang)
        cache = jax.random.normal(next(k), (cap, hd)).astype(jnp.float16)
        for what, ratio, pos0 in shapes:
            start = pos0 - pos0 % ratio

            def ref(i, rows, w, cos, sin, cache, ratio=ratio, pos0=pos0, start=start, fn_trip=fn_trip):
                r16 = model_compressor.row_values(rows, w, cos[start][None], sin[start][None], eps, fn_trip)
                r16 = r16.astype(jnp.float16)
                if (pos0 % ratio + 1) // ratio == 0:  # incomplete: the XLA path writes the row all the same
                    return jax.lax.dynamic_update_slice(cache, r16, (pos0 // ratio, 0))
                return cache.at[pos0 // ratio].set(r16[0])

            args = (rows, w, cos, sin, cache)
            ref_s, want = time_steps(ref, rounds, *args, show=True)
            if (pos0 % ratio + 1) // ratio == 0:  # the kernel leaves an incomplete window's row as it was
                want = np.asarray(cache)
            fn = lambda i, rows, w, c, s, cache, ratio=ratio, pos0=pos0, trip=trip: compressor_row.rows_into_cache(
                rows, w, c, s, cache, jnp.int32(pos0), 1, ratio, eps, trip, interpret=INTERPRET
            )
            nbytes = hd * 4 * 2 + hd * 2
            shape = f"{kind} {what} {hd} cols"
            t = time_variant(
                rec, "compressor_row", 1, shape, f"w{compressor_row.WARPS}", fn, args, want, nbytes, ref_s, rounds
            )
            if t is not None:
                rec.best(f"compressor_row w{compressor_row.WARPS}", 1, shape, t, nbytes, ref_s)


# (what, rows of each matrix, K) of the full model's float-weight launches (F16 in ds4's files)
FLOAT_SHAPES = [
    ("compressor kv+gate ratio-4", (1024, 1024), 4096),
    ("compressor kv+gate ratio-128", (512, 512), 4096),
    ("indexer compressor kv+gate", (256, 256), 4096),
    ("indexer q_b 1024->8192", (8192,), 1024),
    ("xn-fed ratio-4: both compressors + indexer proj", (1024, 1024, 256, 256, 64), 4096),
]
# (rows, BK, warps, stages) beside the base (``float_dense.choose_config``); BK changes the sums'
# order, so each variant is checked exact against XLA's ``adot`` by itself
FLOAT_VARIANTS = [
    (4, 128, 4, 2),
    (16, 128, 4, 2),
    (8, 256, 4, 2),
    (8, 64, 4, 2),
    (8, 128, 2, 2),
    (8, 128, 8, 2),
    (8, 128, 4, 1),
    (8, 128, 4, 3),
    (16, 256, 8, 2),
    (4, 256, 4, 2),
]


def bench_float_dense(rec: Recorder, shapes=FLOAT_SHAPES, variants=FLOAT_VARIANTS, tokens=(1, 2)):
    """The float-weight matmul launch (``float_dense.matmul``, several matrices of one input) against
    XLA's ``adot`` of each, on C weight copies a loop step (≥ 1.5 L2: the weights come from DRAM)."""
    for what, outs, k in shapes:
        wbytes = 2 * sum(outs) * k
        C = 2 if INTERPRET else max(2, min(24, -(-3 * L2_BYTES // (2 * wbytes))))
        key = iter(jax.random.split(jax.random.PRNGKey(17), C * len(outs) + 1))
        copies = [tuple(jax.random.normal(next(key), (o, k)).astype(jnp.float16) for o in outs) for _ in range(C)]
        rounds = 3 if INTERPRET else max(3, min(50, int(2e9 // (wbytes * C))))
        shape = f"{what} {'+'.join(map(str, outs))}x{k}"
        xkey = next(key)
        for n in tokens:
            x = jax.random.normal(xkey, (n, k)) * 2.0
            # x an argument, not a constant: interpreted (CPU), a constant x lets XLA fold the kernel's
            # zero (``kernel_zero``) and with it the products' forced rounding
            xc = [(x, *c) for c in copies]
            ref = lambda x, *ws: tuple(float_dense.reference(x, w) for w in ws)
            want = jax.jit(ref)(*xc[-1])
            ref_s = time_xla_copies(ref, xc, rounds)
            base = float_dense.choose_config(outs, k)
            cfgs = [base] + [
                dataclasses.replace(float_dense.choose_config(outs, k, rows=r, block_k=bk), num_warps=w, num_stages=st)
                for r, bk, w, st in (variants if n == 1 and not INTERPRET else ())
            ]
            nbytes = wbytes + 4 * n * (k + sum(outs))  # the weights, x and the outputs
            best = None
            for cfg in cfgs:
                kern = lambda x, *ws, cfg=cfg: float_dense.matmul(x, ws, cfg, interpret=INTERPRET)
                try:
                    got = jax.jit(kern)(*xc[-1])
                    s = time_xla_copies(kern, xc, rounds, show=n == 1 and cfg == base)
                except Exception as e:  # noqa: BLE001
                    print(f"  float_dense N={n} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                ok = all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))
                label = f"r{cfg.block_rows}k{cfg.block_k}s{cfg.k_splits}w{cfg.num_warps}st{cfg.num_stages} C{C}"
                rec.variant("float_dense", n, shape, label, ok, s, nbytes, ref_s)
                if ok and (best is None or s < best[0]):
                    best = (s, label)
            if best is not None:
                rec.best(f"float_dense {best[1]}", n, shape, best[0], nbytes, ref_s)


def main() -> None:
    global Q8_SHAPES, EXPERT_SHAPES, INTERPRET, N_EXPERT, TOKENS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true", help="base configurations only")
    ap.add_argument(
        "--only",
        default="q8_0,q8_0_quant,q8_0_mosaic,experts,experts_quant,norms,norm_quant,hc_pre,hc_post,quantize,attention,"
        "compressor_pool,compressor_row,float_dense",
    )
    ap.add_argument("--sweep-u", default="4", help="blocks per step U to sweep (with rows × K splits)")
    ap.add_argument("--sweep-n", default="1", help="token counts of the sweep")
    ap.add_argument("--shapes", default="", help="comma-separated name parts: only these Q8_0 shapes")
    ap.add_argument("--expert-shapes", default="", help="comma-separated name parts: only these expert shapes")
    ap.add_argument("--tokens", default="1,2,4", help="token counts of the base configurations")
    ap.add_argument("--cores", action="store_true", help="q8_0: time the CUDA-core (dp4a) variant beside the base")
    ap.add_argument(
        "--q8-unroll", default="", help="q8_0 --cores: also each CUDA-core launch with V steps' loads at once"
    )
    ap.add_argument("--q8-splits", default="", help="q8_0 --cores: also the CUDA-core launches at these K splits")
    ap.add_argument(
        "--rows-warps", default="64x4", help="q8_0 with --cores: rows x warps a program (the K split stays)"
    )
    ap.add_argument("--float-shapes", default="", help="float_dense: comma-separated name parts of the shapes to time")
    ap.add_argument(
        "--float-variants",
        default="",
        help="float_dense: rows/BK/warps/stages launches beside the base, e.g. 32/256/8/2",
    )
    ap.add_argument("--expert-cfgs", default="", help="experts: launches beside the base, e.g. r32s4w2,r64s4w4st1")
    ap.add_argument(
        "--u",
        default="",
        help="q8_0: blocks a step U to time beside the base's (e.g. 8; K split kept where it divides)",
    )
    ap.add_argument(
        "--cores-max-n", type=int, default=4, help="q8_0 with --cores: time the CUDA-core launches up to this N"
    )
    ap.add_argument(
        "--raw",
        action="store_true",
        help="q8_0 and experts: also each launch's own kernel time (Q8_0: its K-split partials left for their reader, "
        "as the engine's split= calls do)",
    )
    ap.add_argument("--raw-only", action="store_true", help="with --raw: only the launches' own kernel times")
    a = ap.parse_args()
    TOKENS = tuple(int(t) for t in a.tokens.split(","))
    raws = [False] * (not (a.raw and a.raw_only)) + [True] * a.raw  # each base run: as a call, its kernel alone
    if a.expert_shapes:
        EXPERT_SHAPES = [e for e in EXPERT_SHAPES if any(part in e[0] for part in a.expert_shapes.split(","))]
    t0 = time.time()
    left = lambda: a.minutes * 60 - (time.time() - t0)
    card = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        Q8_SHAPES = [(nm, o // 32, k // 8, g) for nm, o, k, g in Q8_SHAPES[1:3] + Q8_SHAPES[6:7]]
        EXPERT_SHAPES = [(nm, q, o // 64, k // 8) for nm, q, o, k in EXPERT_SHAPES]
        INTERPRET, N_EXPERT = True, 8
        copy_bw = 1e11
    else:
        copy_bw = copy_bandwidth()
    print(f"{card}: torch device copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    os.makedirs(a.out, exist_ok=True)
    rec = Recorder(a.out, card, copy_bw)
    only = a.only.split(",")
    q8b, exb = Q8Bench(rec), ExpertBench(rec)
    # 1. every shape at its base configuration
    if "q8_0" in only:
        for name, out, k, g in Q8_SHAPES if not a.shapes else sweep_shapes(a.shapes):
            base = q8_0.choose_config(out, k, g)
            variants = [base]  # and with --cores, the CUDA-core launches (rows x warps a program)
            for u in (int(v) for v in a.u.split(",") if v and int(v) != base.blocks_per_step):
                splits = base.k_splits  # the same K split where U·splits still divides the blocks
                while splits and (k // 32) % (u * splits):
                    splits //= 2
                if splits:
                    variants.append(dataclasses.replace(base, blocks_per_step=u, k_splits=splits))
            for tc in list(variants):  # --cores: the CUDA-core launches of each U (rows x warps a program)
                for rw in a.rows_warps.split(",") if a.cores else ():
                    rows, warps = (int(v) for v in rw.split("x"))
                    if (out // g) % rows == 0:
                        core = dataclasses.replace(tc, cores=True, block_rows=rows, num_warps=warps)
                        forms = [core] + [  # --q8-splits: other K splits (the summation grouping) of it
                            dataclasses.replace(core, k_splits=sp)
                            for sp in (int(t) for t in a.q8_splits.split(",") if t)
                            if sp != core.k_splits and (k // 32) % (sp * core.blocks_per_step) == 0
                        ]
                        for c in forms:
                            variants.append(c)
                            for v in (int(t) for t in a.q8_unroll.split(",") if t):  # loads of v steps at once
                                if v > 1 and q8_0.steps_of(k // 32, c) % v == 0:
                                    variants.append(dataclasses.replace(c, unroll=v))
            for n in TOKENS:
                for cfg in variants:
                    if left() > 0 and not (cfg.cores and n > a.cores_max_n):
                        for raw in raws:
                            q8b.run(name, out, k, g, n, cfg, raw=raw)
    if "q8_0_quant" in only:  # the kernel quantizing its f32 activations itself, base configurations
        for name, out, k, g in Q8_SHAPES if not a.shapes else sweep_shapes(a.shapes):
            for n in TOKENS:
                if left() > 0:
                    q8b.run_quantizing(name, out, k, g, n, q8_0.choose_config(out, k, g))
    if "q8_0_mosaic" in only:  # the Triton-vs-Mosaic comparison: every config, largest shapes first
        for name, out, k, g in sweep_shapes(a.shapes):
            for mcfg in MOSAIC_CONFIGS[: 1 if INTERPRET else None]:
                for n in TOKENS[: 1 if INTERPRET else None]:  # interpreted, Mosaic is slow
                    if left() > 0:
                        q8b.run_mosaic(name, out, k, g, n, mcfg)
    if "q8_0_launch" in only:  # the engine's launches (no stack index; several matrices in one)
        lb = Q8Launch(rec)
        for name, outs, k in (
            LAUNCH_SHAPES
            if not INTERPRET
            else [(nm, tuple(o // 32 for o in os_), kk // 8) for nm, os_, kk in LAUNCH_SHAPES[:2]]
        ):
            for n in TOKENS:
                for c in (False, True) if a.cores else (False,):
                    if left() > 0:
                        for raw in raws:
                            lb.run(name, outs, k, n, c, raw=raw)
            if left() > 0:
                lb.floor(name, outs, k)
    if "experts" in only:  # v3 (dp4a on packed words) at its base configuration; gate+up in one launch
        for name, qt, out, k in EXPERT_SHAPES:
            for pair in (False, True) if name.startswith("gate/up") else (False,):
                for n in TOKENS:
                    if left() > 0:
                        base = experts.choose_config(qt, out, k // 256)
                        for raw in raws:
                            exb.run(name, qt, out, k, n, base, pair=pair, raw=raw)
                        for cfg in expert_configs(a.expert_cfgs):
                            if left() > 0:
                                exb.run(name, qt, out, k, n, cfg, pair=pair)
    if "experts_quant" in only:  # the engine's calls: f32 in, quantized in the kernel (gate+up as a pair)
        for name, qt, out, k in EXPERT_SHAPES:
            for n in TOKENS:
                if left() > 0:
                    cfg = experts.choose_config(qt, out, k // 256, whole=False)  # whole-K: int8 in only
                    exb.run(name, qt, out, k, n, cfg, pair=name.startswith("gate/up"), quant=True)
    if "q8_0_rows" in only and left() > 0:  # a prefill chunk's rows (not in the default list)
        shapes = Q8_SHAPES[:3] if INTERPRET else sweep_shapes(a.shapes)
        bench_q8_rows(rec, shapes, **({"tokens": (8,), "rounds": 2} if INTERPRET else {}))
    if "norms" in only and left() > 0:
        bench_norms(rec, **({"q_rank": 128, "head_dim": 128, "n_head": 8, "rounds": 3} if INTERPRET else {}))
    if "hc_pre" in only and left() > 0:
        bench_hc_pre(rec, **({"n_embd": 1024, "rounds": 3, "n_iter": 3} if INTERPRET else {}))
    if "quantize" in only and left() > 0:
        bench_quantize(rec, **({"rounds": 3, "shapes": QUANT_SHAPES[:2]} if INTERPRET else {}))
    if "norm_quant" in only and left() > 0:
        bench_norm_quant(rec, **({"n_embd": 1024, "q_rank": 256, "head_dim": 128, "rounds": 3} if INTERPRET else {}))
    if "hc_post" in only and left() > 0:
        bench_hc_post(rec, **({"n_embd": 1024, "rounds": 3, "n_iter": 3} if INTERPRET else {}))
    if "attention" in only and left() > 0:
        bench_attention(rec, **({**ATTN_SMALL, "rounds": 3} if INTERPRET else ATTN_FULL))
    if "compressor_pool" in only and left() > 0:
        bench_compressor_pool(
            rec, **({"rounds": 3, "shapes": [(w, r, c, 64) for w, r, c, _ in POOL_SHAPES]} if INTERPRET else {})
        )
    if "compressor_row" in only and left() > 0:
        small = [("attention", 128, 32, ("fp8", 96, 32)), ("indexer", 64, 16, ("fp4", 32))]
        bench_compressor_row(rec, **({"rounds": 3, "kinds": small} if INTERPRET else {}))
    if "float_dense" in only and left() > 0:
        shapes = [f for f in FLOAT_SHAPES if not a.float_shapes or any(p in f[0] for p in a.float_shapes.split(","))]
        variants = [tuple(int(v) for v in c.split("/")) for c in a.float_variants.split(",") if c] or FLOAT_VARIANTS
        small = [(w, tuple(o // 16 for o in outs), k // 8) for w, outs, k in shapes[:2]]
        kw = {"shapes": small, "tokens": (1,)} if INTERPRET else {"shapes": shapes, "variants": variants}
        bench_float_dense(rec, **kw)
    # 2. variants while time is left, at --sweep-n (variants.csv)
    if not a.quick:
        if "q8_0" in only:
            sweep_ns = [int(t) for t in a.sweep_n.split(",")]
            for name, out, k, g in sweep_shapes(a.shapes):
                for cfg in q8_variants(out, k, g, us=tuple(int(u) for u in a.sweep_u.split(","))):
                    for n in sweep_ns:
                        if left() > 30:
                            q8b.run(name, out, k, g, n, cfg)
            for name, out, k, g in sweep_shapes(a.shapes):  # then stages/warps around each winner
                n = sweep_ns[0]
                if (name, n) in q8b.best:
                    for cfg in tunings(q8b.best[(name, n)][1], stages=(2, 4, 6)):
                        if left() > 30:
                            q8b.run(name, out, k, g, n, cfg)
        if "experts" in only:
            sweep_ns = [int(t) for t in a.sweep_n.split(",")]
            for name, qt, out, k in EXPERT_SHAPES:
                for cfg in expert_variants(qt, out, k):
                    for n in sweep_ns:
                        if left() > 30:
                            exb.run(name, qt, out, k, n, cfg)
            for name, qt, out, k in EXPERT_SHAPES:  # stages/warps around each winner, then every N
                n = sweep_ns[0]
                if (name, n) in exb.best:
                    win = exb.best[(name, n)][1][1]
                    for cfg in tunings(win, stages=(1, 3, 4)):
                        if left() > 30:
                            exb.run(name, qt, out, k, n, cfg)
                    win = exb.best[(name, n)][1][1]
                    for m in TOKENS:
                        if m not in sweep_ns and left() > 20:
                            exb.run(name, qt, out, k, m, win)
    for (name, n), (s, cfg, nbytes, ref_s) in q8b.best_mosaic.items():
        rec.best(f"q8_0_mosaic r{cfg.block_rows}U{cfg.blocks_per_step}st{cfg.stages}", n, name, s, nbytes, ref_s)
    for (name, n), (s, cfg, nbytes, ref_s) in q8b.best_quant.items():
        rec.best(f"q8_0 quantizing U{cfg.blocks_per_step}r{cfg.block_rows}s{cfg.k_splits}", n, name, s, nbytes, ref_s)
    for tag, best in (("", q8b.best), (RAW_TAG, q8b.best_raw)):
        for (name, n), (s, cfg, nbytes, ref_s) in best.items():
            rec.best(
                f"q8_0 U{cfg.blocks_per_step}r{cfg.block_rows}s{cfg.k_splits}w{cfg.num_warps}st{cfg.num_stages}"
                + CORES_TAG * cfg.cores
                + tag,
                n,
                name,
                s,
                nbytes,
                ref_s,
            )
    for tag, best in (("", exb.best), (RAW_TAG, exb.best_raw)):
        for (name, n), (s, (v, cfg), nbytes, ref_s) in best.items():
            rec.best(f"experts v{v} {expert_label(cfg)}{tag}", n, name, s, nbytes, ref_s)
    print(f"\ncopy {copy_bw / 1e9:.0f} GB/s on {card}")
    print(f"{'kernel':22s} {'N':>2s} {'shape':28s} {'us':>9s} {'GB/s':>6s} {'%copy':>6s} {'xla us':>9s}")
    for r in rec.rows:
        print(f"{r[1]:22s} {r[2]:2d} {r[3]:28s} {r[4]:>9s} {r[5]:>6s} {r[6]:>6s} {r[7]:>9s}")


if __name__ == "__main__":
    main()
