"""What XLA did with each CUDA graph (command buffer) of a run, from its log
(``TF_CPP_VMODULE=command_buffer_thunk=3``): how often each graph was recorded, re-recorded for
moved buffers and evicted, and the host time those took. A graph is named by its command count.

    TF_CPP_VMODULE=command_buffer_thunk=3 python3 speed-bench/ab_decode.py ... 2> cb.log
    python3 speed-bench/cb_log.py cb.log

Session 50 read the plain loop's graph (2,107 commands) recorded once and never updated, beside the
MTP step's (11 top-level commands) recorded once in 70 ms.
"""

from __future__ import annotations

import collections
import re
import sys

_START = re.compile(r"(Initialize|Update) command buffer .*?num_commands=(\d+)")
_DONE = re.compile(r"(Initialized|Updated) command buffer\b.*? in (\d+) .*?num_commands=(\d+)")
_MOVED = re.compile(r"after (\d+) executions.*updated_allocs=(\d+)")
_EVICTED = re.compile(r"Evicted (\d+) command buffer")


def summarize(lines) -> dict:
    """{"graphs": {commands: {"init": n, "init_us": us, "update": n, "update_us": us}},
    "moved": Counter((commands, executions since the last update, allocations moved)),
    "evicted": command buffers evicted in all} of a command-buffer log's lines."""
    graphs: dict = collections.defaultdict(lambda: {"init": 0, "init_us": 0, "update": 0, "update_us": 0})
    moved: collections.Counter = collections.Counter()
    evicted = 0
    for line in lines:
        if m := _DONE.search(line):
            kind = "init" if m.group(1) == "Initialized" else "update"
            graphs[int(m.group(3))][f"{kind}_us"] += int(m.group(2))
        elif m := _START.search(line):
            n = int(m.group(2))
            graphs[n]["init" if m.group(1) == "Initialize" else "update"] += 1
            if mv := _MOVED.search(line):
                moved[n, int(mv.group(1)), int(mv.group(2))] += 1
        elif m := _EVICTED.search(line):
            evicted += int(m.group(1))
    return {"graphs": dict(graphs), "moved": moved, "evicted": evicted}


def report(summary: dict, top: int = 20) -> list[str]:
    out = [f"{'commands':>9s} {'recorded':>9s} {'us each':>9s} {'updated':>8s} {'us each':>8s}"]
    for n, g in sorted(summary["graphs"].items(), key=lambda kv: -kv[0]):
        out.append(
            f"{n:9d} {g['init']:9d} {g['init_us'] / max(g['init'], 1):9.0f} {g['update']:8d} "
            f"{g['update_us'] / max(g['update'], 1):8.0f}"
        )
    out.append(f"command buffers evicted: {summary['evicted']}")
    out.append("updates by (commands, executions since the last, allocations moved), most first:")
    out += [f"{c:8d}  {k}" for k, c in summary["moved"].most_common(top)]
    return out


if __name__ == "__main__":
    with open(sys.argv[1], errors="replace") as f:
        print("\n".join(report(summarize(f))))
