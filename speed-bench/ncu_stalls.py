"""Where a kernel's warps wait, per SASS instruction, from Nsight Compute's warp-stall sampling.

    ncu --clock-control none -k regex:q8_0 --launch-skip 1 --launch-count 1 --set full \\
        --import-source no -o /tmp/q8 python speed-bench/ncu_kernel.py q8_0 --out 4096 --k 4096 --n 1
    ncu -i /tmp/q8.ncu-rep --page source --csv --print-source sass > q8_sass.csv
    python speed-bench/ncu_stalls.py q8_sass.csv [--top 25]

Prints the stall samples by opcode (with the warp instructions each executed) and the instructions
with the most samples. A sample sits on the instruction a warp could not issue, so a load's latency
shows on the first instruction that uses its result (session 17: the Q8_0 kernel's f16→f32
conversion of its weight scales, right after their plain load).
"""

from __future__ import annotations

import argparse
import csv


def _opcode(source: str) -> str:
    """The opcode of a SASS line without its modifiers or predicate: ``@P0 LDG.E R2, …`` → ``LDG``."""
    words = [w for w in source.split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    with open(a.csv, newline="") as f:
        rows = list(csv.reader(f))
    hi = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if hi is None:
        raise SystemExit(f"{a.csv}: no 'Address' header: not ncu's --page source --csv output")
    head = rows[hi]
    body = [r for r in rows[hi + 1 :] if len(r) == len(head)]
    samples, executed = head.index("Warp Stall Sampling (All Samples)"), head.index("Instructions Executed")
    num = lambda r, c: int(r[c] or 0)
    total = sum(num(r, samples) for r in body) or 1
    print(
        f"{a.csv}: {len(body)} SASS lines, {total} stall samples, {sum(num(r, executed) for r in body)} warp instructions"
    )
    by: dict = {}
    for r in body:
        op = _opcode(r[1])
        s, e = by.get(op, (0, 0))
        by[op] = (s + num(r, samples), e + num(r, executed))
    print("by opcode: % of stall samples, warp instructions executed")
    for op, (s, e) in sorted(by.items(), key=lambda kv: -kv[1][0])[:16]:
        print(f"  {op:10s} {100 * s / total:5.1f} %  {e:9d}")
    print("instructions with the most samples:")
    for r in sorted(body, key=lambda r: -num(r, samples))[: a.top]:
        print(f"  {100 * num(r, samples) / total:5.1f} %  {r[0][-5:]}  {r[1].strip()[:70]:70s} executed {r[executed]}")


if __name__ == "__main__":
    main()
