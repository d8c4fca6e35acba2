"""Whether XLA's Triton keeps a register cap (``pallas_kernels.registers.MAXNREG``) on a GPU.

    python speed-bench/maxnreg_check.py [--cap experts_10:64]     # seconds on a GPU machine

Compiles one Q2_K routed-expert launch (the name ``experts_10``) with the cap, XLA dumping its
files, and looks for PTX's ``.maxnreg`` in them. The cap reaches Pallas's Triton module as the
attribute ``ttg.maxnreg`` (``tests/test_kernels.py`` checks that on the CPU); whether XLA's own
Triton pipeline turns it into ``.maxnreg`` is what only a GPU compile shows. Without a GPU it
lowers for one and reports the attribute in the module instead.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", default="experts_10:64", help="registers.MAXNREG for the launch")
    ap.add_argument("--dir", default="", help="XLA's dump directory (default: a new temporary one)")
    a = ap.parse_args()
    dump = a.dir or tempfile.mkdtemp(prefix="maxnreg_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pallas_kernels import experts, registers
    from pallas_kernels.testing import expert_planes

    registers.install()
    registers.MAXNREG = a.cap
    out, k = 4096, 2048  # the q2 model's routed down: 2048 -> 4096, Q2_K
    planes = expert_planes(jax.random.PRNGKey(0), experts.Q2_K, 8, out, k // 256)
    cfg = experts.choose_config(experts.Q2_K, out, k // 256)
    x = jnp.ones((6, k), jnp.int8)
    dx = jnp.ones((6, k // 256), jnp.float32)
    ids = jnp.arange(6, dtype=jnp.int32)
    launch = lambda x, dx, ids, p: experts.matmul(x, dx, ids, experts.Q2_K, p, cfg)
    if jax.default_backend() != "gpu":
        import sass  # beside this script; imported after install(): it keeps the lowering it wraps

        irs = sass.triton_ir(launch, x, dx, ids, planes)
        print(f"no GPU: the lowered Triton module carries ttg.maxnreg: {any('ttg.maxnreg' in m for m in irs)}")
        return
    jax.block_until_ready(jax.jit(launch)(x, dx, ids, planes))
    files = [f for f in glob.glob(os.path.join(dump, "**", "*"), recursive=True) if os.path.isfile(f)]
    hits = []
    for f in files:
        with open(f, errors="replace") as fh:
            if "maxnreg" in fh.read():
                hits.append(f)
    ptx = [f for f in files if f.endswith(".ptx")]
    print(f"{len(files)} dumped files ({len(ptx)} .ptx) under {dump}; 'maxnreg' in {len(hits)}:")
    for f in hits[:10]:
        print("  ", os.path.relpath(f, dump))
    print("XLA keeps the cap" if any(f.endswith(".ptx") for f in hits) else "no .maxnreg in XLA's PTX")


if __name__ == "__main__":
    main()
