"""How many kernels one compiled decode step launches, read from the optimized HLO.

    python speed-bench/launches.py [--model M.gguf] [--ctx 256] [--modes all,auto,off]

Counts the top-level thunks of the compiled decode program (fusions, custom calls such as
the Pallas kernels and cuBLAS/cuDNN calls, copies, sorts...), with while-loop bodies
multiplied by their known trip counts, with every kernel (DS4JAX_KERNELS=all), the default
(auto) and the XLA path (off). At a few microseconds per launch, this count caps tokens/s
before bandwidth does.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRITON_TARGET = "__gpu$xla.gpu.triton"  # the custom call of a Pallas-Triton kernel
LAUNCH_OPS = (
    "fusion",
    "custom-call",
    "copy",
    "sort",
    "dot",
    "convolution",
    "reduce",
    "scatter",
    "gather",
    "dynamic-update-slice",
    "select-and-scatter",
    "all-reduce",
    "transpose",
    "concatenate",
)


def count_launches(hlo: str) -> tuple[int, collections.Counter]:
    comps: dict[str, list[str]] = {}
    cur = None
    entry = None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if cur and line.strip() and line.strip() != "}":
            comps[cur].append(line.strip())
    fused = {c for lines in comps.values() for ln in lines for c in re.findall(r"calls=%?([\w.\-]+)", ln)}
    kinds: collections.Counter = collections.Counter()

    def walk(name: str, mult: int) -> int:
        total = 0
        for ln in comps.get(name, []):
            m = re.search(r"= [^=]*? (\w[\w\-]*)\(", ln)
            op = m.group(1) if m else ""
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", ln).group(1)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ln)
                total += walk(body, mult * (int(trip.group(1)) if trip else 1))
            elif op in ("call", "conditional"):
                for c in re.findall(
                    r"(?:to_apply|branch_computations=\{|true_computation|false_computation)=?%?([\w.\-]+)", ln
                ):
                    total += walk(c, mult)
            elif op in LAUNCH_OPS and name not in fused:
                kind = "pallas" if TRITON_TARGET in ln else op
                kinds[kind] += mult
                total += mult
        return total

    return walk(entry, 1), kinds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--modes", default="all,auto,off", help="DS4JAX_KERNELS values to count")
    a = ap.parse_args()
    import jax

    from ds4jax.default_model import base_path_or_default
    from ds4jax.engine import Engine
    from ds4jax.model_file import open_model

    mf = open_model(base_path_or_default(a.model))
    if jax.default_backend() != "gpu":
        print("(not a GPU: these are the CPU backend's thunks, not GPU kernel launches)")
    for mode in a.modes.split(","):
        os.environ["DS4JAX_KERNELS"] = mode
        eng = Engine(mf, ctx=a.ctx, chunk=16)
        hlo = eng.program("decode").as_text()
        n, kinds = count_launches(hlo)
        print(f"kernels={mode}: {n} launches per decode step; {dict(kinds.most_common())}", flush=True)


if __name__ == "__main__":
    main()
