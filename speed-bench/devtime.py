"""Device time of a jitted program, read from the profiler: the sum of its GPU kernels' durations.

Wall-clock timing of a ``fori_loop`` of calls over-counts small kernels: on the GPU each loop
iteration also pays the while loop's predicate copy to the host (~10 µs), and one call's dispatch
(65–145 µs) is spread over the iterations. The kernels' own durations (CUPTI, through
``jax.profiler``) have neither, so ``per_call`` reports what a call adds to a compiled step's
device time: Σ kernel durations of a loop of calls, minus the same loop with an empty body.
Off GPU it falls back to wall clock (the CPU smoke mode only checks that the script runs).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import glob
import itertools
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

_LAYOUT_SHOWN = False


def kernel_events(path: str):
    """(name, duration ns) of every kernel on the GPU's stream lines of one trace."""
    global _LAYOUT_SHOWN
    pd = jax.profiler.ProfileData.from_file(path)
    out = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        names = [ln.name for ln in plane.lines]
        if not _LAYOUT_SHOWN:
            print(f"  [profiler] {plane.name}: lines {names}", flush=True)
            _LAYOUT_SHOWN = True
        # Stream lines hold the kernels; 'XLA Ops' / 'XLA Modules' lines are derived spans of them.
        streams = [ln for ln in plane.lines if ln.name.startswith("Stream")]
        for ln in streams or [ln for ln in plane.lines if "XLA" not in ln.name]:
            out += [(ev.name, ev.duration_ns) for ev in ln.events]
    return out


# Kernel name → where its time goes (first match wins; the rest is "other XLA fusions").
CLASSES = (
    ("q8_0_share", "Q8_0 kernel"),
    ("q8_0_rows", "Q8_0 rows kernel"),
    ("experts_", "expert kernels"),
    ("sinkhorn", "Sinkhorn kernel"),
    ("hadamard", "Hadamard kernel"),
    ("fdot", "F32/F16 kernel"),
    ("gemm", "XLA dots"),
    ("cublas", "XLA dots"),
    ("Memcpy", "copies"),
    ("copy", "copies"),
)


def classify(name: str) -> str:
    return next((c for key, c in CLASSES if key in name), "other XLA fusions")


def class_report(by: dict, per: int, top: int, indent: str = "    ") -> None:
    """Print the kernels ``by`` ({name: (count, ns)}) per ``per`` calls: µs and share by class
    (``classify``), then the ``top`` kernels by time (count a call, µs a launch)."""
    total = sum(t for _, t in by.values())
    classes: collections.Counter = collections.Counter()
    for name, (_, t) in by.items():
        classes[classify(name)] += t
    for c, t in classes.most_common():
        print(f"{indent}{c:20s} {t / per / 1e3:9.1f} us  {100 * t / total:5.1f} %", flush=True)
    for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{indent}{c // per:4d} x {t / c / 1e3:8.2f} us  {name[:80]}", flush=True)


@contextlib.contextmanager
def csv_rows(out_dir: str, name: str, header: list[str]):
    """A function appending one row (flushed at once, so a run cut short keeps its rows) to
    ``out_dir/name``; the header goes first when the file is new."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)

        def write(row) -> None:
            w.writerow(row)
            f.flush()

        yield write


def _marks(events) -> list:
    """(time, +1 start / -1 end, index) of every event's start and end, in time order."""
    return sorted(
        [(t0, 1, i) for i, (_, t0, _) in enumerate(events)] + [(t1, -1, i) for i, (_, _, t1) in enumerate(events)]
    )


def exposed(events) -> tuple[int, dict]:
    """(ns with any kernel running, {name: ns it ran alone}) of (name, start ns, end ns) events.

    With a CUDA graph's kernels side by side (``CONCURRENT``, session 31) a kernel's duration no
    longer says what it costs the step: what nothing overlaps is what a cut can gain. A sweep over
    the events' ends; a stretch with exactly one kernel running is that kernel's alone."""
    running: set = set()
    busy, alone, last = 0, collections.Counter(), None
    for t, kind, i in _marks(events):
        if last is not None and running:
            busy += t - last
            if len(running) == 1:
                alone[events[next(iter(running))][0]] += t - last
        (running.add if kind == 1 else running.discard)(i)
        last = t
    return busy, dict(alone)


def idle_gaps(events) -> dict:
    """{name: (gaps, ns, gaps over 5 us)}: the time no kernel ran on any stream line before each
    kernel that ended such a stretch, of (name, start ns, end ns) events. With a graph's kernels
    side by side (``CONCURRENT``) one line's gaps say nothing of the GPU's idle time; the stretches
    with nothing running anywhere do, and the kernel after each is where the wait ends (session 41:
    a one-graph MTP step kept the GPU busy 11.1 ms of its 30.1 ms span)."""
    running: set = set()
    out: dict = {}
    idle_since = None
    for t, kind, i in _marks(events):
        if kind == 1:
            if not running and idle_since is not None:
                name = events[i][0]
                c, ns, big = out.get(name, (0, 0, 0))
                out[name] = (c + 1, ns + t - idle_since, big + (t - idle_since > 5e3))
            running.add(i)
        else:
            running.discard(i)
            if not running:
                idle_since = t
    return out


def timeline_report(path: str, steps: int, classify, top: int = 12) -> None:
    """Where a step's wall time goes besides its kernels: the idle time on the GPU before each
    kernel (by the class of the kernel that follows), and the host's runtime calls (launches,
    graph launches, syncs) per step. A decode step of ~400 kernels took 2.2 ms for 1.4 ms of
    kernel time (session 11); whether the rest is per-kernel launch latency inside CUDA graphs or
    host-launched segments between graphs decides what to cut."""
    pd = jax.profiler.ProfileData.from_file(path)
    gaps: dict = {}
    host: dict = {}
    span = busy = n_lines = 0
    everything = []  # (name, start, end) of every kernel on every stream line
    for plane in pd.planes:
        lines = list(plane.lines)
        if plane.name.startswith("/device:GPU"):
            for ln in (x for x in lines if x.name.startswith("Stream")):
                evs = sorted(ln.events, key=lambda e: e.start_ns)
                if not evs:
                    continue
                n_lines += 1
                everything += [(e.name, e.start_ns, e.end_ns) for e in evs]
                span += evs[-1].end_ns - evs[0].start_ns
                busy += sum(e.duration_ns for e in evs)
                for prev, ev in itertools.pairwise(evs):
                    g = max(0.0, ev.start_ns - prev.end_ns)
                    key = classify(ev.name)
                    c, t, big = gaps.get(key, (0, 0.0, 0))
                    gaps[key] = (c + 1, t + g, big + (g > 5e3))
        else:  # host planes: XLA's runtime annotations and CUPTI's driver-API calls (which plane
            # and line carry them differs between jax versions, so every one is listed)
            for ln in lines:
                if ln.name == "python":
                    continue
                for ev in ln.events:
                    k = f"{plane.name}|{re.sub(r'/-?[0-9]+$', '', ln.name)}|{ev.name}"
                    c, t = host.get(k, (0, 0.0))
                    host[k] = (c + 1, t + ev.duration_ns)
    if n_lines == 1:  # one stream: the gaps between kernels are the GPU's idle time
        print(
            f"  [timeline] GPU stream span {span / steps / 1e3:.0f} us a step, kernels busy {busy / steps / 1e3:.0f} us, "
            f"idle {(span - busy) / steps / 1e3:.0f} us",
            flush=True,
        )
        for key, (c, t, big) in sorted(gaps.items(), key=lambda kv: -kv[1][1]):
            print(
                f"    idle before {key:20s} {t / steps / 1e3:8.1f} us a step over {c / steps:6.0f} kernels ({big / steps:.0f} gaps > 5 us)",
                flush=True,
            )
    # Kernels side by side (several stream lines, or one line's events overlapping: a CUDA graph
    # traced with xla_enable_command_buffers_during_profiling): the GPU's busy time and, by kernel,
    # the time nothing else ran beside it.
    union, alone = exposed(everything)
    # A CUDA graph's kernels side by side land on many stream lines (session 32: 356 at 43 layers),
    # so the span is the first start to the last end over all of them.
    whole = max(e for _, _, e in everything) - min(s for _, s, _ in everything) if everything else 0
    print(
        f"  [timeline] span {whole / steps / 1e3:.0f} us a step; kernels on {n_lines} stream lines: busy {union / steps / 1e3:.0f} us a step for "
        f"{busy / steps / 1e3:.0f} us of kernel time ({busy / max(union, 1):.2f} running at once on average); "
        f"alone {sum(alone.values()) / steps / 1e3:.0f} us",
        flush=True,
    )
    for name, t in sorted(alone.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    alone {t / steps / 1e3:8.1f} us a step  {name[:100]}", flush=True)
    if n_lines > 1:  # the stretches with nothing running on any line, by the kernel that ends them
        idle = idle_gaps(everything)
        total = sum(ns for _, ns, _ in idle.values())
        print(f"  [timeline] nothing running {total / steps / 1e3:.0f} us a step; most before:", flush=True)
        for name, (c, ns, big) in sorted(idle.items(), key=lambda kv: -kv[1][1])[:top]:
            print(
                f"    idle {ns / steps / 1e3:8.1f} us a step over {c / steps:6.1f} gaps ({big / steps:.1f} > 5 us)  {name[:90]}",
                flush=True,
            )
    print("  [timeline] host events a step (count, us each; plane|line|name), most frequent:", flush=True)
    for name, (c, t) in sorted(host.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {c / steps:8.1f} x {t / c / 1e3:8.2f} us  {name[:110]}", flush=True)
    print("  [timeline] ... and the longest in all:", flush=True)
    for name, (c, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {c / steps:8.1f} x {t / c / 1e3:8.2f} us  {name[:110]}", flush=True)


_OPCODE = re.compile(r"([a-z][a-z0-9-]*)\(")


def entry_summary(hlo_text: str, top: int = 12) -> None:
    """What a step runs: the compiled program's ENTRY instructions by opcode. Older XLA wrapped
    runs of kernels into command buffers in the HLO (``call`` to a ``command_buffer``
    computation, counted here); the XLA of jax 0.11 forms them from the thunk sequence after it,
    so none show (session 13: 0 at 8 and at 43 layers, though switching them off made an 8-layer
    step 3x slower)."""
    lines, inside = [], False
    for ln in hlo_text.splitlines():
        if ln.startswith("ENTRY "):
            inside = True
        elif inside and ln.startswith("}"):
            break
        elif inside and " = " in ln:
            lines.append(ln)
    ops: collections.Counter = collections.Counter()
    graphs = 0
    for ln in lines:
        m = _OPCODE.search(ln.split(" = ", 1)[1])
        op = m.group(1) if m else "?"
        if op == "call" and "command_buffer" in ln:
            graphs += 1
            continue
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', ln)
            op = f"custom-call {t.group(1) if t else '?'}"
        if op not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            ops[op] += 1
    print(f"  [entry] {graphs} command buffers; {sum(ops.values())} other ENTRY instructions:", flush=True)
    for op, c in ops.most_common(top):
        print(f"    {c:6d}  {op}", flush=True)


def _hlo_table(lines: list[str], name: str, pattern: str) -> dict:
    """One of the HLO text's stack-frame tables (``FileNames``, ``FileLocations``, ...): id -> fields."""
    out: dict = {}
    if name not in lines:
        return out
    for ln in lines[lines.index(name) + 1 :]:
        m = re.match(pattern, ln)
        if not m:
            break
        out[int(m.group(1))] = m.groups()[1:]
    return out


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{kernel name as the profiler shows it (``input_reduce_fusion_12``): (site, chain)} from the
    compiled HLO's stack-frame tables: ``site`` is the innermost model file and line that made the
    instruction (``attention.py:66``), ``chain`` its ds4jax/pallas_kernels frames innermost first.
    A frame's printed ``parent_frame_id`` is taken as the parent's id plus one: read off the CPU
    HLO of jax 0.12 (the dev machine's), where that gives call chains that match the source; the
    GPU machine's jax 0.11 is assumed to print the same."""
    lines = hlo_text.splitlines()
    files = {k: v[0] for k, v in _hlo_table(lines, "FileNames", r'^(\d+) "(.*)"$').items()}
    locs = {
        k: (files.get(int(f), "?"), int(line))
        for k, (f, line) in _hlo_table(
            lines, "FileLocations", r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)"
        ).items()
    }
    frames = {
        k: (int(loc), int(parent))
        for k, (loc, parent) in _hlo_table(
            lines, "StackFrames", r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}"
        ).items()
    }

    def chain(fid: int) -> list[str]:
        out: list[str] = []
        while fid in frames and len(out) < 40:
            loc, parent = frames[fid]
            f, line = locs.get(loc, ("?", 0))
            if "/ds4jax/" in f or "/pallas_kernels/" in f:
                out.append(f"{'/'.join(f.split('/')[-2:])}:{line}")
            fid = parent - 1 if parent - 1 != fid else 0
        return out

    res = {}
    for m in re.finditer(r"^\s*%?([\w.\-]+) = [^\n]*?stack_frame_id=(\d+)", hlo_text, re.MULTILINE):
        c = chain(int(m.group(2)))
        model = [x for x in c if x.startswith("model/") and not x.startswith(("model/numerics", "model/linear"))]
        res[m.group(1).replace(".", "_")] = (model[0] if model else (c[0] if c else "?"), " < ".join(c[:5]))
    return res


def by_source(by: dict, sources: dict, steps: int, top: int = 25) -> None:
    """The profile's kernels ({name: (count, ns)} over ``steps``) summed by the model line that
    made them (``hlo_sources``): the fusion-by-source table."""
    sites: dict = {}
    for name, (c, t) in by.items():
        site, ch = sources.get(name, (f"kernel {name[:40]}", ""))  # a Pallas kernel: its own name
        n, tt, ex = sites.get(site, (0, 0.0, ch))
        sites[site] = (n + c, tt + t, ex)
    total = sum(t for _, t, _ in sites.values())
    print(f"  [sources] kernel time by the model line that made it ({len(sites)} lines):", flush=True)
    for site, (c, t, ex) in sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]:
        print(
            f"    {t / steps / 1e3:8.1f} us a step {100 * t / max(total, 1):5.1f} %  {c / steps:6.0f} kernels  {site:28s} {ex[:90]}",
            flush=True,
        )


def _trace_file(trace_dir: str) -> str | None:
    """The profiler's xplane file under ``trace_dir`` (None if it wrote none)."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    return files[0] if files else None


def _tally(path: str | None) -> dict:
    """{kernel name: (count, ns)} from the trace file ``path``."""
    by: dict = {}
    for name, ns in kernel_events(path) if path else []:
        c, t = by.get(name, (0, 0))
        by[name] = (c + 1, t + ns)
    return by


def trace_calls(step, n: int, classify=None, steps_per_call: int = 1) -> tuple[float, dict]:
    """(Σ kernel ns, {name: (count, ns)}) over n calls of ``step`` (warmed first) under the
    profiler; with ``classify``, also the idle-time and host-event report (``timeline_report``,
    per decode step: a call runs ``steps_per_call`` of them)."""
    d = tempfile.mkdtemp(prefix="ds4steps")
    with jax.profiler.trace(d):
        for _ in range(n):
            out = step()
        jax.block_until_ready(out)  # every kernel inside the trace
    path = _trace_file(d)
    if classify is not None and path:
        timeline_report(path, n * steps_per_call, classify, top=20)
    by = _tally(path)
    return float(sum(t for _, t in by.values())), by


def kernel_ns(run, *args) -> tuple[float, dict, object]:
    """(Σ kernel ns, {name: (count, ns)}, output) of one call of the jitted ``run`` (compiled
    and warmed first)."""
    jax.block_until_ready(run(*args))
    d = tempfile.mkdtemp(prefix="ds4trace")
    with jax.profiler.trace(d):
        res = jax.block_until_ready(run(*args))
    by = _tally(_trace_file(d))
    return float(sum(t for _, t in by.values())), by, res


def per_call(fn, steps: int, *args, show: bool = False, prep=None, only: str | None = None) -> tuple[float, object]:
    """(device seconds per call of fn(i, *args), fn(steps - 1, *args)) for fn called at
    i < steps in one fori_loop (one call site): Σ kernel durations less those of the same loop
    with an empty body (its counter, predicate and initial zeros), over steps.

    ``prep(i)``: the part of fn that only serves the bench (which weight copy or experts step i
    uses — an XLA kernel per call that the engine does not run); the empty loop computes it too,
    so its time is subtracted with the loop's. That subtraction is short by ~0.8 µs a call on an
    H200 (session 39: the loop's index arithmetic runs as two kernels beside fn and as one in the
    empty loop). ``only``: the time is instead that of the kernels whose names contain it (a
    launch's own duration, nothing of the bench around it)."""

    def loop(body):
        @jax.jit
        def run(*args):
            out = jax.eval_shape(lambda: fn(jnp.int32(0), *args))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
            return jax.lax.fori_loop(0, steps, lambda i, c: body(i, c, args), zero)

        return run

    # The barrier ties the arguments to i without a kernel, so XLA cannot hoist a call that
    # does not use i out of the loop; in the empty loop it keeps the loop itself.
    run = loop(lambda i, c, args: fn(i, *jax.lax.optimization_barrier((i, args))[1]))
    empty = loop(lambda i, c, args: jax.lax.optimization_barrier((i, c, prep and prep(i)))[1])
    if jax.default_backend() != "gpu":
        jax.block_until_ready(run(*args))
        t = time.perf_counter()
        res = jax.block_until_ready(run(*args))
        return (time.perf_counter() - t) / steps, res
    ns, by, res = kernel_ns(run, *args)
    if show:
        for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:8]:
            print(f"    [kernels] {c:6d} x {t / max(c, 1) / 1e3:9.2f} us  {name[:90]}", flush=True)
    if only is not None:
        picked = [t for name, (_, t) in by.items() if only in name]
        if not picked:
            raise RuntimeError(f"per_call: no kernel named like {only!r} ({', '.join(list(by)[:8])})")
        return sum(picked) / steps * 1e-9, res
    ns0, by0, _ = kernel_ns(empty, *args)
    if show:
        print(f"    [empty loop] {sum(c for c, _ in by0.values())} kernels, {ns0 / 1e3:.1f} us", flush=True)
    return max(ns - ns0, 0.0) / steps * 1e-9, res
