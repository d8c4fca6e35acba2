"""A/B of decode-step variants inside one process, timed interleaved.

Why: on the H200 machine the same 4-layer decode program measured 381.6 tokens/s in one process
and 642.6 in another (session 12, `decode_full.py`, same flags); host and clock state move a
step's wall time by ±30 % between processes. Here every variant is compiled in one process over
one set of weights, then timed in rounds (variant A, B, C, A, B, C, ...; ``--steps`` back-to-back
decode steps each), so slow and fast spells hit all of them alike; the median round is reported.

A variant is ``label`` or ``label:key=value,key=value``. Keys:
  kernels=auto|all|off      DS4JAX_KERNELS while the variant's program is traced
  layout=gguf|nib|auto      the routed experts' gate/up layout (a converted copy of the weights; one
                            layout for all variants: converted as the weights are made)
  feed=loopK                K decode_fed steps a call, in one program (``Engine.decode_loop``)
  feed=mtp                  MTP speculative steps, one a call (``speculative.mtp_step``: the N=2
                            verify step or the N=1 step, chosen on the device); times are per step,
                            and a verify step commits 1 or 2 tokens (random weights' drafts almost
                            never pass)
  feed=mtpK                 K MTP steps a call, in one program (``speculative.mtp_loop``, as the
                            decoder runs them with --steps_per_call K)
  margin=M                  (feed=mtp, mtpK) the margin a draft needs: 0 verifies every step, 1e9 none
  feed=host|device          the token passed in and outputs allocated per call (``decode``), or
                            kept in a donated buffer on the device (``decode_fed``)
  sync=true                 read each call's tokens on the host before the next call starts (the
                            loop of ``Engine.generate`` before session 14);
  sync=ahead                (feed=device or loopK) read each call's tokens, through a copy
                            (``engine.peek``), after the next call is dispatched, as
                            ``Engine.generate`` does (with feed=loop4 since session 15)
  xla_...=value             an XLA option for its compile (``Engine(compiler_options=...)``);
                            '+' separates a list's items (xla_gpu_enable_command_buffer=FUSION+WHILE;
                            an empty value is an empty list: no command buffers)
  package.module.NAME=value a module constant while the program is traced (e.g.
                            pallas_kernels.dispatch.QUANTIZE_IN_KERNEL=true), restored after

    python speed-bench/ab_decode.py --layers 4 \\
        --variants "base;graph1:xla_gpu_graph_min_graph_size=1;xla:kernels=off"

Results are appended to ``$OUT/ab.csv`` (card, preset, layers, label, options, median / min / max
ms a token, tokens/s at the median, note). ``--device_steps N`` (GPU) also traces N steps of each
variant under the profiler and appends its kernel time and kernel count a step to
``$OUT/ab_device.csv``: a step's GPU time does not move with the host's spells, so it decides
between variants where the wall time is host-bound and noisy (8 layers: rounds spread ±20 %),
and it is the wall time once the step is GPU-bound (all 43 layers, session 13).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import re
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import devtime  # speed-bench/devtime.py, beside this script

from ds4jax import speculative, xla_options
from ds4jax.bench import copy_tree  # each variant's copy of the prefilled state (its steps donate it)
from ds4jax.engine import Engine, compile_together, layout_keep_free, peek  # peek: generate's copy of a step's token
from ds4jax.errors import DS4Error
from ds4jax.mtp import init_mtp_state
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.quant.layouts import EXPERT_LAYOUTS, expert_layout_counts, with_expert_layout
from ds4jax.random_weights import random_weights
from ds4jax.sampling import SamplingParams

CHUNK = 64  # the engines' prefill chunk (their state's shape; the repack's memory budget counts it)


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _steps(feed: str, prefix: str) -> int:
    """K of a feed named ``prefix`` + K (K > 0), else 0."""
    tail = feed[len(prefix) :] if feed.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else 0


@dataclasses.dataclass
class Variant:
    label: str
    kernels: str  # DS4JAX_KERNELS while the program is traced
    layout: str = "gguf"  # the routed experts' gate/up layout
    feed: str = "host"  # host: Engine.decode; device: Engine.decode_fed; loopK: Engine.decode_loop; mtp, mtpK
    margin: float = 0.0  # feed=mtp: the draft margin that selects the verify step (an input, not compiled)
    sync: str = "false"  # the token read on the host every step: false, true, or ahead (a step late)
    xla: dict = dataclasses.field(default_factory=dict)  # XLA compile options
    consts: dict = dataclasses.field(default_factory=dict)  # (module, name) -> value while traced

    @property
    def loop(self) -> int:
        """K for feed=loopK (decode steps a call of ``decode_loop``), else 0."""
        return _steps(self.feed, "loop")

    @property
    def mtp(self) -> int:
        """MTP steps a call for feed=mtp (1) or mtpK (K), else 0."""
        return 1 if self.feed == "mtp" else _steps(self.feed, "mtp")

    @property
    def steps(self) -> int:
        """Decode steps a call."""
        return self.loop or self.mtp or 1

    @property
    def program(self) -> str:
        if self.mtp:
            return f"mtp_loop{self.mtp}"
        return {"host": "decode", "device": "decode_fed"}.get(self.feed, f"decode_loop{self.loop}")

    def describe(self) -> str:
        named = {f"{mod.__name__}.{name}": v for (mod, name), v in self.consts.items()}
        return " ".join(
            f"{k}={v}"
            for k, v in [("kernels", self.kernels), ("layout", self.layout), *self.xla.items(), *named.items()]
            + ([("feed", self.feed)] if self.feed != "host" else [])
            + ([("margin", self.margin)] if self.mtp else [])
            + ([("sync", self.sync)] if self.sync != "false" else [])
        )


def parse_variant(text: str) -> Variant:
    """'label:key=value,...' -> a Variant (module docstring for the keys)."""
    label, _, rest = text.strip().partition(":")
    if not label:
        raise DS4Error(f"variant {text!r} has no label")
    v = Variant(label, os.environ.get("DS4JAX_KERNELS", "auto"))
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise DS4Error(f"variant {label!r}: {item!r} is not key=value")
        if key == "kernels":
            v.kernels = value
        elif key == "layout":
            if value not in EXPERT_LAYOUTS:
                raise DS4Error(f"variant {label!r}: layout must be one of {', '.join(EXPERT_LAYOUTS)}")
            v.layout = value
        elif key == "feed":
            if value not in ("host", "device", "mtp") and not (_steps(value, "loop") or _steps(value, "mtp")):
                raise DS4Error(f"variant {label!r}: feed must be host, device, mtp, mtpK or loopK (K > 0 steps a call)")
            v.feed = value
        elif key == "margin":
            try:
                v.margin = float(value)
            except ValueError:
                raise DS4Error(f"variant {label!r}: margin must be a number, got {value!r}") from None
        elif key == "sync":
            if value.lower() not in ("true", "false", "ahead"):
                raise DS4Error(f"variant {label!r}: sync must be true, false or ahead")
            v.sync = value.lower()
        elif key.startswith("xla_"):
            v.xla[key] = _value(value.replace("+", ","))
        elif "." in key:
            module, _, name = key.rpartition(".")
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                raise DS4Error(f"variant {label!r}: no module {module!r}") from e
            if not hasattr(mod, name):
                raise DS4Error(f"variant {label!r}: {module} has no {name}")
            v.consts[(mod, name)] = _value(value)
        else:
            raise DS4Error(f"variant {label!r}: unknown key {key!r} (kernels=, layout=, xla_..., or module.NAME)")
    if v.sync == "ahead" and v.feed == "host":
        raise DS4Error(f"variant {label!r}: sync=ahead reads the tokens a call late, which needs feed=device or loopK")
    return v


@contextlib.contextmanager
def traced_under(v):
    """The variant's setting while its programs are traced: ``DS4JAX_KERNELS`` and its module
    constants (restored after), the jit caches cleared (inner jitted kernels' traces do not key on
    module constants)."""
    os.environ["DS4JAX_KERNELS"] = v.kernels  # read while the program is traced
    saved = {k: getattr(*k) for k in v.consts}
    for (mod, name), value in v.consts.items():
        setattr(mod, name, value)
    jax.clear_caches()
    try:
        yield
    finally:
        for (mod, name), value in saved.items():
            setattr(mod, name, value)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-q2")
    ap.add_argument("--layers", type=int, default=4, help="keep the first N blocks (0: all)")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--variants", default="base", help="';'-separated variants (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64, help="decode steps a variant per round")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--note", default="")
    ap.add_argument("--device_steps", type=int, default=0, help="steps a variant traced for its GPU time (0: none)")
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="with --device_steps: each variant's GPU idle time, host events, and the kernels' overlap (the "
        "time each ran alone; give the variant xla_enable_command_buffers_during_profiling=true to trace its "
        "CUDA graphs as they run, kernels side by side, instead of kernel by kernel)",
    )
    ap.add_argument(
        "--top",
        type=int,
        default=0,
        help="with --device_steps: each variant's kernels by name (µs and launches a step), and what each "
        "variant adds to or takes from the first one's, the N kernels that move most (names with their "
        "numbering dropped, so XLA's fusions of two programs compare)",
    )
    ap.add_argument(
        "--hlo",
        action="store_true",
        help="with --top: the kernels summed by the model line that made them (each program's compiled HLO "
        "names it), and the diffs by line",
    )
    ap.add_argument(
        "--serial_compile",
        action="store_true",
        help="compile the variants' programs one after another instead of in parallel threads (XLA autotunes "
        "some kernels by timing them while it compiles; session 33 found a plain step 0.5 ms slower when its "
        "program compiled beside the MTP step's)",
    )
    ap.add_argument(
        "--blocked",
        action="store_true",
        help="each variant's rounds one after another instead of interleaved (sessions 33-34: a plain step "
        "timed between MTP steps in one process ran ~0.5 ms slower than without an MTP program there)",
    )
    ap.add_argument(
        "--fill",
        type=int,
        default=0,
        help="prompt tokens prefilled (random ids, the first variant's engine) into one state that every "
        "variant then copies: steps attend over a filled context, as the bench's do (0: from an empty state)",
    )
    ap.add_argument(
        "--mtp_weights",
        action="store_true",
        help="load the MTP block's weights even when no variant feeds MTP steps (as the CLI does with "
        "--mtp_draft): the plain step with the memory they take (fewer gate/up tensors fit as nibbles)",
    )
    a = ap.parse_args()
    xla_options.configure()  # the engine's XLA runtime options (the CLI's), unless XLA_FLAGS sets them
    variants = [parse_variant(v) for v in a.variants.split(";") if v.strip()]
    if len({v.label for v in variants}) != len(variants):
        raise DS4Error("variant labels must differ")
    p = load_preset(a.preset)
    if a.layers:
        p = with_layers(p, a.layers)
    cfg = preset_config(p)
    card = jax.devices()[0].device_kind
    mtp = a.mtp_weights or any(v.mtp for v in variants)  # the MTP block's weights too
    layouts = {v.layout for v in variants}
    if len(layouts) == 1 and "gguf" not in layouts:  # one converted layout only: converted as made
        # (each tensor given up after its conversion, within the memory the engine leaves), so the
        # whole model as nibbles fits an H200; variants of two layouts keep both copies
        (only,) = layouts
        keep = layout_keep_free(cfg, a.ctx, CHUNK)
        weights = {only: jax.block_until_ready(random_weights(cfg, p, mtp=mtp, expert_layout=only, keep_free=keep))}
        print("gate/up expert tensors as {}: {} of {}".format(only, *expert_layout_counts(weights[only])), flush=True)
    else:
        weights = {"gguf": jax.block_until_ready(random_weights(cfg, p, mtp=mtp))}
    mtp_exe, mtp_secs = {}, {}  # feed=mtp(K): the compiled mtp_loop of each (engine, K)
    engines, built, builds = {}, {}, {}  # built: one engine per program setting (variants differing
    for v in variants:  # only in feed or sync share it, and each program compiles once)
        setting = dataclasses.replace(v, feed="host", sync="false").describe()  # what the programs depend on
        if v.layout not in weights:  # a converted copy beside the stored layout: both stay in memory
            weights[v.layout] = jax.block_until_ready(with_expert_layout(weights["gguf"], v.layout))
        if setting not in built:
            built[setting] = Engine(
                types.SimpleNamespace(config=cfg),
                ctx=a.ctx,
                chunk=CHUNK,
                weights=weights[v.layout],
                compiler_options=v.xla,
            )
        eng = built[setting]
        engines[v.label] = (eng, v)
        if (setting, v.program) in builds:
            continue
        with traced_under(v):
            low = mtp_lower(eng, a.ctx, v.mtp) if v.mtp else eng.lower(v.program)
        if v.mtp:
            builds[setting, v.program] = lambda key=(eng, v.mtp), low=low: mtp_build(key, low, mtp_exe, mtp_secs)
        else:
            builds[setting, v.program] = lambda eng=eng, name=v.program, low=low: eng.compile(
                [name], lowered={name: low}
            )
    first = next(iter(engines.values()))[0]
    if a.fill:  # the prefill programs of one engine, beside the variants' (a state is any engine's)
        if not 0 < a.fill < a.ctx:
            raise DS4Error(f"--fill must be in 1..{a.ctx - 1} (the context), got {a.fill}")
        builds["fill"] = lambda: first.compile(["prefill"])
    t0 = time.perf_counter()
    if a.serial_compile:  # one after another: no compile's autotuning times its kernels beside another's work
        for build in builds.values():
            build()
    else:
        compile_together(list(builds.values()))  # XLA compiles in parallel threads (minutes each at 43 layers)
    how = "one after another" if a.serial_compile else "side by side"
    print(f"{len(builds)} programs compiled {how} in {time.perf_counter() - t0:.1f} s", flush=True)
    for label, (eng, v) in engines.items():
        secs = mtp_secs[eng, v.mtp] if v.mtp else eng.compile_s[v.program]
        exe = mtp_exe[eng, v.mtp] if v.mtp else eng.program(v.program)
        temp = exe.memory_analysis().temp_size_in_bytes / 2**20  # XLA's temporaries (scheduling modes move it)
        print(f"{label}: {secs:.1f} s to compile, {temp:.1f} MiB of temporaries ({v.describe()})", flush=True)
    params = SamplingParams(temperature=0.0).arrays()
    key = jax.random.key(0)
    filled = None
    if a.fill:
        ids = np.random.default_rng(0).integers(0, cfg.n_vocab, a.fill)
        t0 = time.perf_counter()
        _, _, filled = first.prefill(first.new_state(), ids, params, key)
        filled = jax.block_until_ready(filled)  # the time printed is the prefill's
        print(f"prefilled {a.fill} tokens in {time.perf_counter() - t0:.1f} s (copied into every variant's state)")
    box = {
        label: [
            eng.new_state() if filled is None else copy_tree(filled),
            first_io(eng, var, a.ctx),
        ]
        for label, (eng, var) in engines.items()
    }

    def run(label: str, n: int) -> int:
        """About n decode steps of the variant (whole calls of ``steps``); returns how many ran."""
        (eng, var), b = engines[label], box[label]
        late = None  # sync=ahead: the previous call's tokens copy, read after this call is dispatched
        calls = max(1, n // var.steps)
        for _ in range(calls):
            t0 = time.perf_counter()
            if var.feed == "host":
                b[1], _, b[0] = eng.decode(b[0], b[1], params, key)
                td = time.perf_counter()
                if var.sync == "true":
                    b[1] = int(b[1])  # the host needs the token before the next step
            elif var.mtp:  # b[1]: (mtp_state, io), as MTPSpeculativeDecoder.generate runs it
                b[0], mtp_state, io = mtp_exe[eng, var.mtp](eng.weights, b[0], *b[1])
                td = time.perf_counter()
                b[1] = (mtp_state, io)
                if var.sync == "true":
                    np.asarray(io["reports"])
                elif var.sync == "ahead":
                    if late is not None:
                        np.asarray(late)
                    late = speculative.peek_report(io)
            else:
                if var.loop:
                    b[0], b[1] = eng.decode_loop(b[0], b[1], params, key, var.loop)
                else:
                    b[0], b[1] = eng.decode_fed(b[0], b[1], params, key)
                td = time.perf_counter()
                if var.sync == "true":
                    np.asarray(b[1]["tokens" if var.loop else "token"])
                elif var.sync == "ahead":  # as Engine.generate
                    if late is not None:
                        np.asarray(late[0])
                    late = peek(b[1], False)
            in_call[label] = in_call.get(label, 0.0) + time.perf_counter() - t0
            in_dispatch[label] = in_dispatch.get(label, 0.0) + td - t0
        jax.block_until_ready(b[1])
        return calls * var.steps

    in_call: dict = {}  # host seconds spent in each variant's calls (and its token reads)
    in_dispatch: dict = {}  # of which in the program's call alone (enqueued, not waited for)
    for label in engines:  # warm
        run(label, 4)
    in_call.clear()
    in_dispatch.clear()
    ms: dict = {label: [] for label in engines}
    rounds = range(a.rounds)
    order = [lb for lb in engines for _ in rounds] if a.blocked else [lb for _ in rounds for lb in engines]
    for label in order:
        t0 = time.perf_counter()
        n = run(label, a.steps)
        ms[label].append((time.perf_counter() - t0) / n * 1e3)
    header = ["card", "preset", "layers", "label", "options", "ms_median", "ms_min", "ms_max", "tok_s", "note"]
    with devtime.csv_rows(a.out, "ab.csv", header) as write:
        for v in variants:
            t = sorted(ms[v.label])
            med = t[len(t) // 2]
            host = in_call[v.label] / (a.rounds * a.steps) * 1e3  # dispatch is asynchronous: a host-bound
            disp = in_dispatch[v.label] / (a.rounds * a.steps) * 1e3  # step spends about its whole wall
            print(  # time in the call; the program's call alone: the arguments' handling and the launch
                f"{v.label:12s} {med:7.3f} ms/token median (min {t[0]:.3f}, max {t[-1]:.3f}) = {1e3 / med:7.1f} tokens/s; "
                f"host in the calls {host:.3f} ms a token, {disp:.3f} of it dispatching",
                flush=True,
            )
            write(
                [
                    card,
                    p.name,
                    cfg.n_layer,
                    v.label,
                    v.describe(),
                    f"{med:.3f}",
                    f"{t[0]:.3f}",
                    f"{t[-1]:.3f}",
                    f"{1e3 / med:.1f}",
                    a.note,
                ]
            )

    # Every variant ran the same steps from the same state: variants that differ only in how the
    # step runs (an XLA option, a launch's blocks, steps a call) must end in the same state, bit
    # for bit; the io beside it (tokens, reports) has a shape that follows the steps a call.
    for label in engines:
        st, io = fingerprint(box[label][0]), fingerprint(box[label][1])
        print(f"{label:12s} state after the rounds: {st:#018x}; io {io:#018x}", flush=True)

    if a.device_steps > 0 and jax.default_backend() == "gpu":
        device_times(engines, run, a, card, p.name, cfg.n_layer, mtp_exe)


@jax.jit
def _leaf_print(x):
    """A position-weighted sum of a leaf's bits (uint32, wrapping): equal leaves, equal sums."""
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    pos = jnp.arange(u.size, dtype=jnp.uint32).reshape(u.shape)
    return jnp.sum(u * (pos * jnp.uint32(2654435761) + jnp.uint32(1)))


def fingerprint(tree) -> int:
    """A 64-bit print of every array in ``tree`` (a variant's state and io)."""
    h = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and x.dtype.itemsize <= 4:
            h = (h * 1000003 + int(_leaf_print(x))) % (1 << 64)
    return h


def first_io(eng, var: Variant, ctx: int):
    """What a variant's first call takes beside the state: the token, or the device-side io."""
    if var.feed == "host":
        return jnp.int32(1)
    if var.mtp:
        return mtp_io(eng, var.margin, ctx, var.mtp)
    return eng.new_io(1, var.loop)


def mtp_io(eng, margin: float, ctx: int, steps: int = 1):
    """(mtp_state, io) of a speculative run from token 1 with draft 2 (margin 0 for the first
    step), ``steps`` MTP steps a call."""
    return init_mtp_state(eng.cfg), speculative.step_io(1, 2, 0.0, margin, ctx, steps)


def mtp_lower(eng, ctx: int, steps: int = 1):
    """``mtp_loop`` of ``steps`` for ``eng`` lowered (not compiled) for its state and a
    speculative io."""
    state = jax.eval_shape(eng.new_state)
    mtp_state, io = mtp_io(eng, 0.0, ctx, steps)
    return speculative.lower_step(eng, state, mtp_state, io)


def mtp_build(key, low, exe: dict, secs: dict) -> None:
    """Compiles ``low`` for ``key`` = (engine, MTP steps a call), as MTPSpeculativeDecoder does."""
    t0 = time.perf_counter()
    exe[key] = low.compile(compiler_options=key[0].compiler_options or None)
    secs[key] = time.perf_counter() - t0


def device_times(engines: dict, run, a, card: str, preset: str, layers: int, mtp_exes: dict) -> None:
    """Each variant's kernel time and kernel count a step, traced over ``a.device_steps`` steps."""
    header = ["card", "preset", "layers", "label", "options", "device_us", "kernels", "note"]
    tallies = {}
    with devtime.csv_rows(a.out, "ab_device.csv", header) as write:
        for label, (eng, v) in engines.items():
            n = max(1, a.device_steps // v.steps)  # calls, of v.steps decode steps each
            if a.timeline:
                print(f"{label}: timeline", flush=True)
            ns, by = devtime.trace_calls(
                lambda label=label, k=v.steps: run(label, k), n, devtime.classify if a.timeline else None, v.steps
            )
            us, count = ns / (n * v.steps) / 1e3, sum(c for c, _ in by.values()) / (n * v.steps)
            print(f"{label:12s} {us:9.1f} us of kernels a step, {count:7.1f} kernels", flush=True)
            write([card, preset, layers, label, v.describe(), f"{us:.1f}", f"{count:.1f}", a.note])
            if a.hlo:  # by model line: the key that two programs share
                exe = mtp_exes[eng, v.mtp] if v.mtp else eng.program(v.program)
                sources = devtime.hlo_sources(exe.as_text())
                tallies[label] = (by_site(by, sources), n * v.steps)
            else:
                tallies[label] = (by_family(by), n * v.steps)
    if a.top > 0:
        kernel_diffs(tallies, a.top)


def family(name: str) -> str:
    """A kernel's name without the numbering a program gives it: XLA's fusions (``loop_fusion_12``,
    ``fusion.7``, ``..._remat2``) and the copies of one Pallas kernel (``q8_0_share__6``, ``q8_0_share_``);
    a Pallas kernel's own name (``experts_4112``: the launch's quant types) stays."""
    name = re.sub(r"(__\d+|_+)$", "", name)
    if "fusion" in name or name.startswith(("wrapped", "sort")):  # XLA's own kernels (``sort_151_1``)
        name = re.sub(r"(_remat\d*|[._]\d+)+$", "", name)
    return name


def _fold(by: dict, key) -> dict:
    """{key(name): (count, ns)} summed over the kernels ``by`` ({name: (count, ns)})."""
    out: dict = {}
    for name, (c, t) in by.items():
        c0, t0 = out.get(key(name), (0, 0))
        out[key(name)] = (c0 + c, t0 + t)
    return out


def by_site(by: dict, sources: dict) -> dict:
    """{model line (``devtime.hlo_sources``) or a Pallas kernel's family name: (count, ns)}."""
    return _fold(by, lambda name: sources[name][0] if name in sources else "kernel " + family(name))


def by_family(by: dict) -> dict:
    """{name with its numbering dropped: (count, ns)}: XLA numbers its fusions per program
    (``loop_fusion_12``, ``fusion.7``), so only the family names compare across two programs."""
    return _fold(by, family)


def kernel_diffs(tallies: dict, top: int) -> None:
    """Each variant's ``top`` kernel families a step, then against the first variant: the families
    whose time a step moved most (what a variant's program adds or drops, by kernel)."""
    (base, (b_by, b_per)), *rest = tallies.items()
    for label, (by, per) in tallies.items():
        print(f"{label}: kernels a step by family (launches a step x us a launch)", flush=True)
        for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"  {c / per:7.1f} x {t / c / 1e3:7.2f} us = {t / per / 1e3:8.1f} us  {name[:90]}", flush=True)
    for label, (by, per) in rest:
        print(f"{label} against {base}: kernel families a step, largest moves first", flush=True)
        moves = []
        for name in set(by) | set(b_by):
            c, t = by.get(name, (0, 0))
            c0, t0 = b_by.get(name, (0, 0))
            moves.append((t / per - t0 / b_per, c / per - c0 / b_per, name))
        for dt, dc, name in sorted(moves, key=lambda m: -abs(m[0]))[:top]:
            print(f"  {dt / 1e3:+9.1f} us {dc:+7.1f} launches  {name[:90]}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except DS4Error as e:
        sys.exit(f"ab_decode: {e}")
