"""Runs the Q8_0 kernel a few times on one shape for Nsight Compute to profile.

    ncu --clock-control none -k regex:q8_0 --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight python speed-bench/ncu_q8.py --out 129280 --k 4096 --n 1
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import q8_case  # speed-bench/kernels.py, beside this script

from pallas_kernels import q8_0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=129280)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    xq, dx, qs, d = q8_case(jax.random.key(0), a.n, a.out, a.k, a.groups)
    for _ in range(a.calls):
        q8_0.matmul(xq, dx, qs, d, groups=a.groups).block_until_ready()


if __name__ == "__main__":
    main()
