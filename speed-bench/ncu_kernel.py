"""Runs one Pallas kernel a few times on one shape for Nsight Compute to profile.

    ncu --clock-control none -k regex:q8_0 --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight python speed-bench/ncu_kernel.py q8_0 --out 129280 --k 4096 --n 1
    ncu --clock-control none -k regex:experts --launch-skip 1 --launch-count 1 --set full \
        python speed-bench/ncu_kernel.py experts --qtype IQ2_XXS --out 2048 --k 4096 --n 1
    ncu --clock-control none -k regex:attn_ --launch-skip 2 --launch-count 2 --set full \
        python speed-bench/ncu_kernel.py attention --n 1

``experts`` runs 6 routed experts per token out of 256, as the model does (kernels.py's shapes).
``attention`` runs the decode attention kernels on a ratio-4 layer's keys (64 heads of 512, the
raw window of 128 and the indexer's 512 rows read by index from 1024 compressed rows): one call
is the ``attn_scores`` launch, then ``attn_mix``.
``--interpret`` runs the kernel interpreted (a CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import (  # speed-bench/kernels.py, beside this script
    ATTN_FULL,
    ATTN_SMALL,
    N_EXPERT,
    N_USED,
    attention_inputs,
    expert_inputs,
    q8_case,
)

from pallas_kernels import attention, experts, q8_0
from pallas_kernels.testing import expert_planes


def attention_case(key, n_tok: int, interpret: bool):
    """A ratio-4 layer's decode attention at full size (or small, interpreted): kernels.py's inputs."""
    q, raw, raw_v, comp, rows, comp_v, sink = attention_inputs(key, n_tok, **(ATTN_SMALL if interpret else ATTN_FULL))
    scale = float(np.float32(1.0 / np.sqrt(q.shape[-1])))
    return lambda: attention.sink_attention(
        q, ((raw, None, raw_v), (comp, rows, comp_v)), sink, scale, interpret=interpret
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=("q8_0", "experts", "attention"))
    ap.add_argument("--out", type=int, default=129280)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=1, help="q8_0: block-diagonal groups")
    ap.add_argument("--qtype", default="IQ2_XXS", choices=("IQ2_XXS", "Q2_K", "Q4_K"), help="experts: plane type")
    ap.add_argument("--rows", type=int, default=None, help="experts: rows per program (default: the kernel's)")
    ap.add_argument("--splits", type=int, default=None, help="experts: K splits (default: the kernel's)")
    ap.add_argument("--version", type=int, default=3, help="experts: kernel version (1 or 3)")
    ap.add_argument("--n", type=int, default=1, help="tokens")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--interpret", action="store_true")
    a = ap.parse_args()
    key = jax.random.key(0)
    if a.kernel == "q8_0":
        xq, dx, qs, d = q8_case(key, a.n, a.out, a.k, a.groups)
        run = lambda: q8_0.matmul(xq, dx, qs, d, groups=a.groups, interpret=a.interpret)
    elif a.kernel == "attention":
        run = attention_case(key, a.n, a.interpret)
    else:
        qtype = getattr(experts, a.qtype)
        n_expert = 8 if a.interpret else N_EXPERT
        planes = expert_planes(jax.random.PRNGKey(0), qtype, n_expert, a.out, a.k // 256)
        xq, dx, ids = expert_inputs(key, a.n * N_USED, a.k, n_expert)
        cfg = experts.choose_config(qtype, a.out, a.k // 256)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (("block_rows", a.rows), ("k_splits", a.splits)) if v})
        run = lambda: experts.matmul(xq, dx, ids, qtype, planes, cfg, interpret=a.interpret, version=a.version)
    for _ in range(a.calls):
        run().block_until_ready()


if __name__ == "__main__":
    main()
