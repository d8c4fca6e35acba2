"""torch's device copy and a one-read reduction by size: what one launch of S bytes can reach.

Why: issue 5's mid-size target (Q8_0 at N=1 >= 60 % of the copy bandwidth on 8-64 MB) compares
one launch against the bandwidth of a 1 GiB copy. A launch of a few MB pays its ramp (the first
loads' latency, SMs filling) and its tail (the last programs' loads) at any efficiency of its
loop; this measures what the GPU's own copy and a plain read pay at each size, so a kernel's
percentage can be read against the floor at its size.

Each size is timed as kernel durations under torch's profiler (the kernel alone, as the kernel
bench's "kernel alone" column), over a pool of distinct buffers of 2 GiB in all so that no launch
reads what L2 (50 MB on an H200) kept from the one before. The ceiling is the 1 GiB copy, bytes
read + written a second, as ``kernels.py`` quotes it.

    python speed-bench/copy_floor.py --out $OUT        # GPU with torch; writes copy_floor.csv

``speed-bench/copy_floor.csv`` holds the runs' rows with a run tag in front (KERNELS.md "Session 32").
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import devtime  # speed-bench/devtime.py, beside this script: its CSV appender

SIZES_MB = (1, 2, 4, 8, 9, 12, 16, 18, 24, 32, 36, 48, 64, 128, 256, 512)


def kernel_us(torch, fn, calls: int) -> float:
    """Mean device duration (µs) of the kernels ``fn(i)`` launches, over ``calls`` calls."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i)
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.events() if e.device_type.name == "CUDA")
    return total / calls


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--calls", type=int, default=40)
    a = ap.parse_args()
    card = torch.cuda.get_device_name()
    pool = 1 << 31
    src = torch.empty(pool, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    # The ceiling: one 1 GiB copy (read + written).
    big = 1 << 30
    ceil_us = kernel_us(torch, lambda i: dst[:big].copy_(src[big : 2 * big]), 10)
    ceiling = 2 * big / (ceil_us * 1e-6)
    print(f"{card}: 1 GiB copy {ceil_us:.1f} us, {ceiling / 1e12:.2f} TB/s", flush=True)
    header = ["card", "kind", "mb", "us", "gbps", "pct_copy"]
    with devtime.csv_rows(a.out, "copy_floor.csv", header) as write:  # a row as each size is measured
        for mb in SIZES_MB:
            s = mb << 20
            n = pool // s

            def copy(i, s=s, n=n):  # half the bytes read, half written: s bytes of traffic a launch
                j = (i * 7919) % n
                k = (j + n // 2) % n
                dst[k * s : k * s + s // 2].copy_(src[j * s : j * s + s // 2])

            # s bytes read (random bits as f32: a sum's speed does not look at them), one value written
            def read(i, s=s, n=n):
                j = (i * 7919) % n
                return src[j * s : (j + 1) * s].view(torch.float32).sum()

            for what, fn in (("copy", copy), ("read", read)):
                us = kernel_us(torch, fn, a.calls)
                bw = s / (us * 1e-6)
                write([card, what, mb, f"{us:.2f}", f"{bw / 1e9:.0f}", f"{100 * bw / ceiling:.1f}"])
                print(
                    f"  {what:4s} {mb:4d} MB of traffic: {us:8.2f} us  {bw / 1e9:6.0f} GB/s  "
                    f"{100 * bw / ceiling:5.1f} % of the 1 GiB copy",
                    flush=True,
                )


if __name__ == "__main__":
    main()
