"""What a Pallas-Triton kernel compiles to on Hopper, read on a machine without a GPU.

    pip install triton==3.6.0   # the GPU machine's Triton; its wheel carries ptxas and cuobjdump
    python speed-bench/sass.py q8_0 --out 2048 --k 4096 [--n 1] [--dir /tmp/sass]
    python speed-bench/sass.py experts --qtype Q2_K --out 4096 --k 2048

The kernel is lowered here as a GPU compile would (sm_90), its Triton IR compiled by the pip Triton
(XLA's bundled Triton on the GPU machine is close, not identical), and the SASS counted: registers,
shared memory, layout conversions, barriers, and which global loads are asynchronous copies
(``LDGSTS``: pipelined) and which are plain loads (``LDG``: the warp waits for them where they are
used). TTGIR, PTX and SASS are written under --dir. Session 16 found the Q8_0 kernel's 2-byte scale
loads as plain loads inside the loop this way (speed-bench/KERNELS.md), at no device time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax._src.pallas.triton import gpu_info, lowering

from pallas_kernels import experts, q8_0
from pallas_kernels.testing import expert_planes

_CAPTURED: list[str] = []
_LOWER = lowering.lower_jaxpr_to_triton_module


def _capturing_lower(*a, **k):
    res = _LOWER(*a, **k)
    _CAPTURED.append(res.module.operation.get_asm())
    return res


def triton_ir(fn, *args) -> list[str]:
    """The Triton IR of every Pallas call in ``fn``, lowered for an H100/H200 (sm_90)."""
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    lowering.lower_jaxpr_to_triton_module = _capturing_lower  # the same function on every call
    _CAPTURED.clear()
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return list(_CAPTURED)


def compile_and_count(
    ttir: str, name: str, num_warps: int, num_stages: int, out_dir: str, maxnreg: int | None = None
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:  # Triton's register cap (ptx .maxnreg); Pallas's CompilerParams cannot pass it
        options["maxnreg"] = maxnreg
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(out_dir, f"{name}.{ext}"), "w") as f:
            f.write(k.asm[ext])
    cubin = os.path.join(out_dir, f"{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptx = os.path.join(out_dir, f"{name}.ptx")
    report = subprocess.run(
        [f"{tools}/ptxas", "-v", "-arch=sm_90a", ptx, "-o", os.devnull], check=True, capture_output=True, text=True
    ).stderr
    sass = subprocess.run([f"{tools}/cuobjdump", "-sass", cubin], check=True, capture_output=True, text=True).stdout
    with open(os.path.join(out_dir, f"{name}.sass"), "w") as f:
        f.write(sass)
    ins = [line.split(";")[0] for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    count = lambda pat: sum(bool(re.search(pat, i)) for i in ins)
    return {
        "registers": (re.findall(r"Used (\d+) registers", report) or ["?"])[0],
        "shared_bytes": k.metadata.shared,
        "instructions": len(ins),
        "convert_layout": k.asm["ttgir"].count("convert_layout"),
        "BAR": count(r"\bBAR\b"),
        "LDGSTS (async)": count(r"\bLDGSTS\b"),
        "LDG (plain)": count(r"\bLDG\b"),
        "LDS": count(r"\bLDS"),
        "STS": count(r"\bSTS\b"),
        "IMMA/IGMMA": count(r"\bI(G)?MMA\b"),  # mma.sync or wgmma (Triton picks by the tile shape)
        "IDP (dp4a)": count(r"\bIDP\b"),
        "LDL/STL (spills)": count(r"\b(LDL|STL)\b"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=("q8_0", "experts"))
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=1, help="tokens")
    ap.add_argument("--qtype", default="IQ2_XXS", choices=("IQ2_XXS", "Q2_K", "Q4_K", "IQ2_NIB"))
    ap.add_argument("--dir", default="/tmp/sass")
    ap.add_argument("--cores", action="store_true", help="q8_0: the CUDA-core (dp4a) variant")
    ap.add_argument("--rows", type=int, default=0, help="rows per program (0: the chosen)")
    ap.add_argument("--warps", type=int, default=0, help="warps per program (0: the chosen)")
    ap.add_argument("--maxnreg", type=int, default=0, help="registers a thread at most (0: Triton's choice)")
    a = ap.parse_args()
    S = jax.ShapeDtypeStruct
    if a.kernel == "q8_0":
        cfg = q8_0.config_for((a.out,), a.k, cores=a.cores, n=a.n)  # the engine's launch
        cfg = dataclasses.replace(cfg, block_rows=a.rows or cfg.block_rows, num_warps=a.warps or cfg.num_warps)
        args = [S((a.n, a.k), jnp.int8), S((a.n, a.k // 32), jnp.float32)]
        args += [S((a.out, a.k), jnp.int8), S((a.out, a.k // 32), jnp.float16)]
        irs = triton_ir(lambda x, dx, q, d: q8_0.matmul(x, dx, q, d, cfg=cfg), *args)
    else:
        qtype = getattr(experts, a.qtype)
        planes = expert_planes(jax.random.PRNGKey(0), qtype, 8, a.out, a.k // 256)
        planes = {name: S(p.shape, p.dtype) for name, p in planes.items()}
        cfg = experts.choose_config(qtype, a.out, a.k // 256)  # the engine's launch, rows and warps as given
        cfg = dataclasses.replace(cfg, block_rows=a.rows or cfg.block_rows, num_warps=a.warps or cfg.num_warps)
        pairs = 6 * a.n  # 6 routed experts a token
        args = [S((pairs, a.k), jnp.int8), S((pairs, a.k // 256), jnp.float32), S((pairs,), jnp.int32), planes]
        irs = triton_ir(lambda x, dx, ids, p: experts.matmul(x, dx, ids, qtype, p, cfg), *args)
    name = f"{a.kernel}_{a.qtype if a.kernel == 'experts' else ''}{a.out}x{a.k}_n{a.n}" + "_cores" * a.cores
    print(f"{name}: {cfg}")
    for key, value in compile_and_count(irs[0], name, cfg.num_warps, cfg.num_stages, a.dir, a.maxnreg).items():
        print(f"  {key:16s} {value}")
    print(f"  (TTIR, TTGIR, PTX, SASS under {a.dir}/{name}.*)")


if __name__ == "__main__":
    main()
